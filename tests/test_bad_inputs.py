"""The bad-input corpus (tests/data/bad/cases.yaml): every malformed input makes `spinlm train` fail cleanly.

Each case runs the real CLI in a fresh process, pointed at an EXISTING run directory, and must: exit 2 (the CLI's
code for a user error), print a message that names the file/row/field or the config key, print no traceback, and
leave the run directory byte-for-byte as it was (unless the case lists files it may create or append to).

The launches are independent and mostly wait on Python imports, so they run a few at a time (the module fixture
starts every selected case at once; each test then waits for its own).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import yaml

BAD = Path(__file__).resolve().parent / "data" / "bad"
CASES: list[dict] = yaml.safe_load((BAD / "cases.yaml").read_text(encoding="utf-8"))
UNSET_VAR = "SPINLM_BAD_INPUTS_UNSET"  # cases.yaml interpolates it: it must not exist in the child's environment
EXISTING_RUN = {  # what a previous run left in trainer.output_dir
    "sentinel.txt": b"left by an earlier run: a failed launch must not touch it\n",
    "metrics.jsonl": b'{"round": 1, "step": 1, "kind": "train", "loss": 0.6931}\n',
}


# ------------------------------------------------------------------------------------------------ scratch inputs

def _unreadable_copy(work: Path, run_dir: Path, tiny: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file anyway (directory_not_file covers an unreadable path for root)")
    target = work / "unreadable.jsonl"
    shutil.copy(BAD / "unknown_role.jsonl", target)
    target.chmod(0)


def _model_without_chat_template(work: Path, run_dir: Path, tiny: Path) -> None:
    """The tiny task's SFT model with its chat template removed (transformers 5 keeps it in chat_template.jinja;
    older saves keep it in tokenizer_config.json: drop both)."""
    model = work / "model"
    shutil.copytree(tiny / "sft_model", model, ignore=shutil.ignore_patterns("chat_template.jinja"))
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config, indent=2))
    assert not any("chat_template" in p.read_text(errors="replace") for p in model.glob("*.json"))


def _model_copy(work: Path, tiny: Path, run_dir: Path, *, leave_out: tuple[str, ...] = ()) -> Path:
    """A copy of the tiny task's SFT model, for a new run: an earlier run's metrics in the run directory would be
    refused first (before any model loads), so the case starts from a run directory of its own."""
    (run_dir / "metrics.jsonl").unlink()
    model = work / "model"
    shutil.copytree(tiny / "sft_model", model, ignore=shutil.ignore_patterns(*leave_out))
    return model


def _model_without_weights(work: Path, run_dir: Path, tiny: Path) -> None:
    """A model folder whose safetensors file was never copied (config and tokenizer only)."""
    _model_copy(work, tiny, run_dir, leave_out=("*.safetensors",))


def _model_with_truncated_weights(work: Path, run_dir: Path, tiny: Path) -> None:
    """A copy cut short, as a full disk or an interrupted download leaves it."""
    weights = _model_copy(work, tiny, run_dir) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])


def _model_without_tokenizer(work: Path, run_dir: Path, tiny: Path) -> None:
    """Weights and config, but none of the tokenizer's files."""
    _model_copy(work, tiny, run_dir, leave_out=("tokenizer*", "chat_template.jinja", "special_tokens_map.json"))


def _tokenizer_with_extra_tokens(work: Path, run_dir: Path, tiny: Path) -> None:
    """The model's tokenizer with tokens added but the embedding never resized."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "sft_model")
    rows = json.loads((tiny / "sft_model" / "config.json").read_text())["vocab_size"]
    tok.add_tokens([f"<extra_{i}>" for i in range(rows - len(tok) + 8)])
    tok.save_pretrained(work / "tokenizer")
    (run_dir / "metrics.jsonl").unlink()  # a new run (see _model_copy)


def _dangling_latest(work: Path, run_dir: Path, tiny: Path) -> None:
    """checkpoints/latest names a checkpoint folder that is not there (deleted by hand, or a partial copy)."""
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("3\n")


def _complete_checkpoint(folder: Path) -> None:
    """As much of a checkpoint as the resume checks read before loading anything: its trainer state."""
    import torch

    folder.mkdir(parents=True)
    torch.save({"next_round": 1, "global_step": 2, "skipped_steps": 0, "table": []}, folder / "trainer_state.pt")


def _latest_outside(work: Path, run_dir: Path, tiny: Path) -> None:
    """checkpoints/latest leads out of the run directory, to a complete checkpoint of some other run."""
    _complete_checkpoint(work / "elsewhere" / "3")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("../../work/elsewhere/3\n")


def _checkpoints_file(work: Path, run_dir: Path, tiny: Path) -> None:
    """A file named checkpoints where the run keeps its checkpoint folder (a stray copy, a wrong mv)."""
    (run_dir / "checkpoints").write_text("not a folder")


def _checkpoint_without_optimizer(work: Path, run_dir: Path, tiny: Path) -> None:
    """An online_dpo checkpoint whose optimizer folder was lost (deleted, or not copied along)."""
    _complete_checkpoint(run_dir / "checkpoints" / "1")
    (run_dir / "checkpoints" / "latest").write_text("1\n")


def _earlier_run_pairs(work: Path, run_dir: Path, tiny: Path) -> None:
    """An earlier run's round-1 pairs beside its metrics, and no checkpoint (deleted, or never written)."""
    (run_dir / "rounds" / "1").mkdir(parents=True)
    (run_dir / "rounds" / "1" / "pairs.parquet").write_bytes(b"PAR1 an earlier run's pairs PAR1")


def _damaged_checkpoint(work: Path, run_dir: Path, tiny: Path) -> None:
    """A checkpoint whose trainer state no longer matches the checksum recorded when it was saved."""
    from spinlm.run_dir import write_checksums

    _complete_checkpoint(run_dir / "checkpoints" / "1")
    write_checksums(run_dir / "checkpoints" / "1")
    (run_dir / "checkpoints" / "1" / "trainer_state.pt").write_bytes(b"damaged on disk")
    (run_dir / "checkpoints" / "latest").write_text("1\n")


MAKERS: dict[str, Callable[[Path, Path, Path], None]] = {
    "unreadable_copy": _unreadable_copy,
    "model_without_chat_template": _model_without_chat_template,
    "dangling_latest": _dangling_latest,
    "latest_outside": _latest_outside,
    "checkpoint_without_optimizer": _checkpoint_without_optimizer,
    "checkpoints_file": _checkpoints_file,
    "model_without_weights": _model_without_weights,
    "model_with_truncated_weights": _model_with_truncated_weights,
    "model_without_tokenizer": _model_without_tokenizer,
    "tokenizer_with_extra_tokens": _tokenizer_with_extra_tokens,
    "earlier_run_pairs": _earlier_run_pairs,
    "damaged_checkpoint": _damaged_checkpoint,
}


# ------------------------------------------------------------------------------------------------ run directory

def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under root, by relative path."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _changes(before: dict[str, bytes | None], after: dict[str, bytes | None]) -> list[str]:
    """What a failed launch did to the run directory: it should have done nothing."""
    problems = []
    for name in sorted(before.keys() | after.keys()):
        if before.get(name, b"<absent>") != after.get(name, b"<absent>"):
            what = "added" if name not in before else "removed" if name not in after else "changed"
            problems.append(f"{name}: {what}")
    return problems


# ------------------------------------------------------------------------------------------------ launching

def _fill(text: str, paths: dict[str, Path]) -> str:
    for key, path in paths.items():
        text = text.replace("{" + key + "}", str(path))
    return text


def _launch(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinlm.cli", "train", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _child_env(tiny: Path) -> dict[str, str]:
    # No bytecode: importing the corpus's reward files must not leave __pycache__ in tests/data/bad.
    env = {**os.environ, "SPINLM_TINY_DIR": str(tiny), "TQDM_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(UNSET_VAR, None)
    return env


@pytest.fixture(scope="module")
def launched(request, tiny_task, tmp_path_factory):
    """Prepare and start every selected case; id -> (future result, run dir, snapshot before, skip reason)."""
    wanted = {item.callspec.id for item in request.session.items
              if item.originalname == "test_bad_input_fails_cleanly" and hasattr(item, "callspec")}
    env = _child_env(tiny_task)
    pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
    started: dict[str, tuple[Future | None, Path | None, dict | None, str | None]] = {}
    for case in CASES:
        if case["id"] not in wanted:
            continue
        base = tmp_path_factory.mktemp(case["id"])
        work, run_dir = base / "work", base / "run"
        work.mkdir()
        run_dir.mkdir()
        for name, content in EXISTING_RUN.items():
            (run_dir / name).write_bytes(content)
        try:
            if case.get("make"):
                MAKERS[case["make"]](work, run_dir, tiny_task)
        except pytest.skip.Exception as skip:
            started[case["id"]] = (None, None, None, str(skip))
            continue
        paths = {"bad": BAD, "tiny": tiny_task, "work": work}
        args = ["preset=smoke", f"trainer.output_dir={run_dir}", *(_fill(o, paths) for o in case["overrides"])]
        before = _snapshot(run_dir)  # taken before the launch starts, never racing it
        case_env = {**env, **{k: str(v) for k, v in case.get("env", {}).items()}}
        started[case["id"]] = (pool.submit(_launch, args, case_env), run_dir, before, None)
    yield started
    pool.shutdown(wait=True)


def _params():
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case["xfail"])] if case.get("xfail") else []
        yield pytest.param(case, id=case["id"], marks=marks)


def test_corpus_is_complete():
    """Ids are unique, every file in the corpus is used by some case, every case has a message to look for."""
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 22
    used = " ".join(" ".join(c["overrides"]) for c in CASES)
    unused = [p.name for p in BAD.iterdir() if p.name not in ("cases.yaml", "__pycache__") and f"{{bad}}/{p.name}" not in used]
    assert unused == []
    for case in CASES:
        assert case["expect"] and set(case) <= {"id", "overrides", "expect", "make", "xfail", "env"}, case["id"]
        assert case.get("make") in (None, *MAKERS), case["id"]


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input_fails_cleanly(case, launched):
    future, run_dir, before, skip_reason = launched[case["id"]]
    if skip_reason:
        pytest.skip(skip_reason)
    result = future.result()
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert result.returncode == 2, output[-3000:]
    assert "spinlm train: error:" in result.stderr
    assert re.search(case["expect"], result.stderr, re.MULTILINE), f"expected /{case['expect']}/ in:\n{result.stderr}"
    assert _changes(before, _snapshot(run_dir)) == []


def test_debug_prints_the_traceback(tiny_task, tmp_path):
    """--debug is for reporting a bug: the same bad input, with Python's traceback and the exception type."""
    result = _launch(["preset=smoke", f"trainer.output_dir={tmp_path / 'run'}", "trainer.rounds=abc", "--debug"],
                     _child_env(tiny_task))
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert re.search(r"spinlm\.errors\.ConfigError: - trainer\.rounds=abc: expected an integer", result.stderr), \
        result.stderr[-2000:]
    assert not (tmp_path / "run").exists()
