"""`spinlm evaluate`: pass@k from scored samples, and greedy accuracy and pass@k of a run's checkpoints equal to the
val/acc and val/pass@k the trainer logged for them. (The estimator's hand values: tests/test_pass_at_k.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from spinlm.config import load_config
from spinlm.errors import ConfigError, UserError
from spinlm.config_check import check_eval_config
from spinlm.evaluate import pass_at_k_metrics
from spinlm.evaluate_command import evaluate_path, find_checkpoints, format_table
from spinlm.data.items import load_val_items
from spinlm.extras import installed
from spinlm.main_spin import run
from spinlm.rewards import get_reward_fn
from spinlm.modeling import load_tokenizer


def smoke(tmp_path: Path, *extra: str):
    return load_config(["preset=smoke", f"trainer.output_dir={tmp_path / 'run'}", *extra])


def test_pass_at_k_metrics_from_scored_samples(tiny_task, tmp_path):
    cfg = smoke(tmp_path, "data.val_max_samples=2")
    tok = load_tokenizer(str(tiny_task / "sft_model"))
    items = load_val_items(cfg.data, tok)
    right = lambda it: tok(f"so #### {it.example.ground_truth}").input_ids  # noqa: E731
    wrong = tok("so #### -1").input_ids
    samples = [[right(items[0]), wrong, wrong, wrong], [wrong, wrong, wrong, wrong]]  # 1 of 4, 0 of 4 correct
    m = pass_at_k_metrics(items, samples, tok, get_reward_fn(cfg.reward), [1, 2, 4])
    assert m["val/pass@1"] == pytest.approx((0.25 + 0) / 2)
    assert m["val/pass@2"] == pytest.approx((1 - comb(3, 2) / comb(4, 2) + 0) / 2)
    assert m["val/pass@4"] == pytest.approx((1.0 + 0) / 2)
    assert m["val/pass@1/tiny_arith"] == m["val/pass@1"]
    assert m["val/mean@4"] == pytest.approx((0.25 + 0) / 2)


def test_evaluate_a_run_gives_the_trainers_val_acc_per_round(tiny_task, tmp_path):
    run(smoke(tmp_path, "trainer.rounds=2", "trainer.eval_before_training=false", "trainer.val_pass_k=3"))
    run_dir = tmp_path / "run"
    logged = {r["round"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "val"}
    rows = evaluate_path(run_dir, ["eval.n=3"])
    assert [r["round"] for r in rows] == ["1", "2"]
    for r in rows:
        trainer = logged[int(r["round"])]
        # the same prompts, greedy, the same batches: exactly equal; and the same sampled draws (seed 1, rollout.*)
        assert r["val/acc"] == trainer["val/acc"]
        assert (r["val/pass@3"], r["val/mean@3"]) == (trainer["val/pass@3"], trainer["val/mean@3"])
        assert r["val/prompts"] == 32.0
        assert 0 <= r["val/pass@1"] <= r["val/pass@3"] <= 1
    table = format_table(rows).splitlines()
    assert table[0].split() == ["round", "val/prompts", "val/acc", "val/response_length", "val/pass@1", "val/pass@3",
                                "val/mean@3"]
    assert [line.split()[0] for line in table[1:]] == ["1", "2"]

    # one checkpoint of the run: the run's own config is the base, so the same number comes back
    (only,) = evaluate_path(run_dir / "checkpoints" / "1")
    assert only["val/acc"] == logged[1]["val/acc"] and "val/pass@1" not in only

    # the command as users type it, in a fresh process
    out = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, "-m", "spinlm.cli", "evaluate", str(run_dir / "checkpoints" / "2"),
                           "data.val_max_samples=8", "--output", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[:3] == ["2", "8.0000", f"{json.loads(out.read_text())[0]['val/acc']:.4f}"]
    assert "val/acc/tiny_arith" in json.loads(out.read_text())[0]


def test_evaluate_bad_inputs_name_the_problem(tiny_task, tmp_path):
    with pytest.raises(UserError, match="neither a run directory"):
        find_checkpoints(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_checkpoints(tmp_path)
    model = str(tiny_task / "sft_model")
    # a bare model folder: no run config, so the val files come from the preset or the command line
    with pytest.raises(ConfigError, match="data.val_files=null: spinlm evaluate needs held-out prompts"):
        evaluate_path(model, ["data.val_files=null"])
    cfg = load_config([f"model.path={model}", f"data.val_files={tiny_task / 'val.parquet'}", "eval.n=2",
                       "data.max_prompt_length=96", "data.max_response_length=64", "eval.pass_k=[1,3]", "eval.lm_eval_include_path=/nonexistent"])
    assert check_eval_config(cfg) == [
        "eval.pass_k=[1, 3]: eval.pass_k[1]=3 must be in [1, eval.n=2] (the unbiased estimator needs at least k samples)",
        "eval.lm_eval_include_path=/nonexistent: no such directory (a folder of lm-eval task YAMLs)",
    ]
    OmegaConf.update(cfg, "eval.n", 0)
    OmegaConf.update(cfg, "eval.lm_eval_include_path", None)
    assert check_eval_config(cfg) == ["eval.pass_k=[1, 3]: pass@k needs samples; set eval.n (samples per prompt) "
                                      ">= max(k)"]


def test_lm_eval_custom_local_task_scores_what_spinlm_generates(tiny_task, tmp_path):
    """A generate_until task read from a local jsonl (no network): the harness's exact match on the model's own
    greedy continuation (made here with spinlm's engine) is 1, on a wrong target 0."""
    pytest.importorskip("lm_eval")
    from spinlm.modeling import eos_ids_of
    from spinlm.lm_eval_tasks import run_lm_eval
    from spinlm.rollout.hf_rollout import SamplingParams, generate
    from spinlm.modeling import load_model

    path = str(tiny_task / "sft_model")
    model = load_model(path, dtype="float32", attn_implementation="sdpa", device="cpu").eval()
    tok = load_tokenizer(path)
    questions = ["Noah has 17 coins. He uses 10. How many coins does Noah have now?", "Mia has 3 cups. She buys 4."]
    out = generate(model, [tok(q, add_special_tokens=False).input_ids for q in questions],
                   SamplingParams(max_new_tokens=8, greedy=True), pad_id=tok.pad_token_id,
                   eos_ids=eos_ids_of(tok, model), progress=False)
    own = [tok.decode(r[0], skip_special_tokens=True) for r in out.responses]
    rows = [{"question": questions[0], "answer": own[0]}, {"question": questions[1], "answer": own[1] + " no"}]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'tiny.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    metrics = run_lm_eval(model, tok, ["tiny_gen"], include_path=str(tmp_path), batch_size=2)
    assert metrics == {"lm_eval/tiny_gen/exact_match": 0.5}


def _sent_run_dir(tiny_task, tmp_path) -> tuple[Path, Path]:
    """A run directory as someone might send it: a real checkpoint, and a config.yaml asking for remote code and
    a custom reward whose import leaves a marker file (so the test sees whether it ran)."""
    import shutil

    import torch

    from spinlm.config import resolved, to_yaml

    marker = tmp_path / "their_code_ran"
    reward = tmp_path / "their_reward.py"
    reward.write_text(f"open({str(marker)!r}, 'w').close()\n"
                      "def their_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 1.0\n")
    run_dir = tmp_path / "sent"
    shutil.copytree(tiny_task / "sft_model", run_dir / "checkpoints" / "1")
    torch.save({"next_round": 1}, run_dir / "checkpoints" / "1" / "trainer_state.pt")
    cfg = smoke(tmp_path, f"reward.custom_path={reward}", "reward.custom_name=their_score",
                "model.trust_remote_code=true", "data.val_max_samples=4")
    (run_dir / "config.yaml").write_text(to_yaml(resolved(cfg)))
    return run_dir, marker


def test_evaluate_a_run_dir_never_takes_code_trust_from_its_files(tiny_task, tmp_path):
    run_dir, marker = _sent_run_dir(tiny_task, tmp_path)
    result = subprocess.run([sys.executable, "-m", "spinlm.cli", "evaluate", str(run_dir)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "SPINLM_TINY_DIR": str(tiny_task)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()  # before: check_eval_config imported the run's reward file, running its top level
    config = run_dir / "config.yaml"
    for key, value in (("model.trust_remote_code", "True"), ("reward.custom_path", str(tmp_path / "their_reward.py"))):
        assert (f"{config}: the run used {key}={value}; spinlm evaluate takes it from the command line only, so it "
                f"is not used here (pass {key}=... to use it)") in result.stderr
    assert "val/acc" in result.stdout


def test_evaluate_takes_code_trust_from_the_command_line(tiny_task, tmp_path):
    from spinlm.evaluate_command import eval_config

    run_dir, marker = _sent_run_dir(tiny_task, tmp_path)
    reward = tmp_path / "their_reward.py"
    cfg = eval_config(run_dir / "config.yaml", [f"reward.custom_path={reward}", "reward.custom_name=their_score"],
                      run_dir / "checkpoints" / "1")
    assert (cfg.reward.custom_path, cfg.reward.custom_name, cfg.model.trust_remote_code) == (
        str(reward), "their_score", False)
    assert marker.exists()  # typed by the person running it: imported (by the reward check)


def test_missing_lm_eval_is_reported_before_any_model_loads(tiny_task, tmp_path):
    """Not after loading the model and a full greedy eval: the advice names this checkout's extra."""
    if installed("lm_eval"):
        pytest.skip("lm-evaluation-harness is installed here")
    model = tmp_path / "no_weights"  # a model folder whose weights would fail to load: the check must come first
    model.mkdir()
    for f in (tiny_task / "sft_model").iterdir():
        if not f.name.endswith(".safetensors"):
            (model / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match=r"eval.lm_eval_tasks=\[hellaswag\]: needs lm-evaluation-harness, which "
                                          r"is not installed; install it with: pip install -e \".*\[eval\]\""):
        evaluate_path(model, [f"data.val_files={tiny_task / 'val.parquet'}", "data.max_prompt_length=96",
                              "data.max_response_length=64", "eval.lm_eval_tasks=[hellaswag]"])
