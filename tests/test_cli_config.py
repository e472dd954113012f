"""`spinlm config show|check` and every subcommand's --help, run as a user runs them: in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spinlm.cli import build_parser


def _spinlm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinlm.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> list[str]:
    """Overrides that point the smoke preset at a real tiny model config and data files in tmp."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("cli")
    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=256).save_pretrained(root / "model")
    row = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    (root / "train.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    return [f"model.path={root / 'model'}", f"data.train_files={root / 'train.jsonl'}", "data.val_files=null",
            f"trainer.output_dir={root / 'out'}"]


def _subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(sub.choices)


def test_help_everywhere():
    assert {"train", "sft", "config", "task"} <= set(_subcommands())
    top = _spinlm("--help")
    assert top.returncode == 0 and "usage:" in top.stdout
    for name in _subcommands():
        result = _spinlm(name, "--help")
        assert result.returncode == 0, (name, result.stderr)
        assert f"usage: spinlm {name}" in result.stdout


def test_config_show_prints_resolved_yaml_with_override(tmp_path):
    result = _spinlm("config", "show", "preset=smoke", "trainer.rounds=5", "algorithm.beta=[0.1,5.0,5.0,5.0,5.0]",
                     env={"SPINLM_TINY_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["preset"] == "smoke"
    assert shown["trainer"]["rounds"] == 5
    assert shown["algorithm"]["beta"] == [0.1, 5.0, 5.0, 5.0, 5.0]
    assert shown["trainer"]["train_batch_size"] == 16  # from the smoke preset
    assert shown["model"]["path"] == f"{tmp_path}/sft_model"  # the ${oc.env:...} interpolation, resolved


def test_config_check_ok(paths):
    result = _spinlm("config", "check", "preset=smoke", *paths)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "config check: OK"


def test_config_check_reports_every_problem_and_fails(paths):
    result = _spinlm("config", "check", "preset=smoke", "algorithm.beta=-1", "rollout.n=1",
                     "algorithm.mode=online_dpo", *paths)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "config check: 2 problem(s)",
        "- algorithm.beta=-1: must be > 0 (a number, or a list with one positive value per round)",
        "- rollout.n=1: algorithm.mode=online_dpo needs rollout.n >= 2 (each pair is the best vs the worst of n "
        "samples of the same prompt)",
    ]


def test_check_config_loads_no_model_code(paths):
    """The check must stay cheap: no transformers model classes, and no torch unless GPUs are asked for."""
    script = (
        "import json, sys\n"
        "from spinlm.config import load_config\n"
        "from spinlm.config_check import check_config\n"
        f"problems = check_config(load_config({['preset=smoke', 'algorithm.beta=-1', *paths]!r}))\n"
        "mods = [m for m in sys.modules if m.startswith(('transformers', 'torch'))]\n"
        "print(json.dumps({'problems': problems, 'modules': mods}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["problems"] == ["algorithm.beta=-1: must be > 0 (a number, or a list with one positive value per "
                               "round)"]
    assert "transformers.models.llama.modeling_llama" not in out["modules"]
    assert out["modules"] == []


def test_bad_override_syntax_is_a_clean_error():
    result = _spinlm("config", "check", "trainer.rounds")
    assert result.returncode == 2
    assert "override 'trainer.rounds': expected key=value" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_runs_from_another_directory(paths, tmp_path):
    """Relative defaults (outputs/...) are judged against the current directory, which need not be the repo."""
    result = subprocess.run([sys.executable, "-m", "spinlm.cli", "config", "check", "preset=smoke", *paths[:3],
                             "trainer.output_dir=outputs/x"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (Path(tmp_path) / "outputs").exists()


def test_no_preset_unless_named_and_config_show_says_which():
    """`spinlm train model.path=M data.train_files=F` must not take the tiny demo's settings."""
    from spinlm.config import load_config

    cfg = load_config(["model.path=m", "data.train_files=f.jsonl"])
    assert cfg.preset is None
    assert (cfg.algorithm.beta, cfg.algorithm.dpop_lambda, cfg.algorithm.sft_weight, cfg.actor.lr) == (0.1, 0.0, 0.0, 5e-7)
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length, cfg.data.val_files) == (512, 512, None)
    tiny = load_config(["preset=tiny"])
    assert (tiny.algorithm.beta, tiny.algorithm.dpop_lambda, tiny.actor.lr) == (1.0, 5.0, 2e-4)
    shown = _spinlm("config", "show")
    assert shown.returncode == 0 and shown.stdout.splitlines()[0].startswith("# preset: none")
    assert yaml.safe_load(shown.stdout)["preset"] is None
    shown = _spinlm("config", "show", "preset=smoke")
    assert shown.stdout.splitlines()[0].startswith("# preset: smoke")


def test_bundled_task_is_built_only_when_the_preset_reads_it(tmp_path, monkeypatch):
    from spinlm.config import load_config
    from spinlm.tasks.build import ensure_bundled_task

    monkeypatch.setenv("SPINLM_TINY_DIR", str(tmp_path / "task"))
    # every path overridden away from the bundled task: nothing to build, nothing written
    ensure_bundled_task(load_config(["preset=smoke", "model.path=m", "data.train_files=t.parquet", "data.val_files=null"]))
    ensure_bundled_task(load_config(["model.path=m", "data.train_files=t.parquet"]))  # no preset
    assert not (tmp_path / "task").exists()


def test_every_readme_training_example_names_its_own_output_dir():
    """Run after ./run_spin.sh, an example without its own trainer.output_dir would silently resume the demo in
    outputs/tiny ("all 3 rounds are done") instead of doing what it says."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    text = readme.replace("\\\n", " ")  # shell continuation lines are one command
    commands = re.findall(r"(?:\./run_spin\.sh|spinlm train) +[\w.]+=[^\n`#]*|\btrain\(\[[^\n]*", text)
    assert len(commands) >= 6, commands
    dirs = []
    for command in commands:
        found = re.findall(r"trainer\.output_dir=([^\s\"',\]]+)", command)
        assert len(found) == 1, f"README example without its own trainer.output_dir: {command}"
        dirs += found
    assert "outputs/tiny" not in dirs and len(dirs) == len(set(dirs)), dirs
