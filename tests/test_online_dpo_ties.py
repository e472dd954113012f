"""Online DPO that cannot learn says so: the share of tied prompts per step and per round, a warning for a step with
no pair, and a round with no pair at all stops the run (exit 2) keeping the last checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

from spinlm.cli import main


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_round_of_ties_stops_the_run_and_keeps_the_last_checkpoint(tiny_task, tmp_path, capsys):
    run_dir = tmp_path / "run"
    common = ["preset=smoke", f"trainer.output_dir={run_dir}", "trainer.eval_before_training=false",
              "algorithm.mode=online_dpo", "rollout.n=2", "algorithm.ref_update_every=2", "trainer.train_batch_size=8",
              "data.val_max_samples=4", "data.max_response_length=40"]
    assert main(["train", *common, "trainer.rounds=1"]) == 0  # round 1: the built-in reward separates samples
    first = [r for r in _rows(run_dir) if "rollout/tie_share" in r]
    assert [r["step"] for r in first] == [1, 2]
    for r in first:  # n=2: each of the step's 8 prompts gives a pair or a tie
        assert r["rollout/tie_share"] == r["rollout/ties_dropped"] / 8
        assert r["rollout/pairs"] + r["rollout/ties_dropped"] == 8
    (share,) = [r["rollout/round_tie_share"] for r in _rows(run_dir) if "rollout/round_tie_share" in r]
    assert share == sum(r["rollout/ties_dropped"] for r in first) / 16
    capsys.readouterr()

    constant = tmp_path / "constant.py"  # a reward that never separates samples: every prompt ties
    constant.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                        "    return 0.0\n")
    # a new reward changes the run: resuming with it needs the explicit flag
    assert main(["train", *common, "trainer.rounds=2", f"reward.custom_path={constant}",
                 "trainer.allow_config_change=true"]) == 2
    err = capsys.readouterr().err
    assert err.count("no pair formed: all 8 prompts tied") == 2  # one warning per step
    assert "round 2: no pair was formed in any of its 2 steps" in err
    for knob in ("reward.gsm8k_method=flexible", "reward.format_score", "rollout.n=2", "rollout.temperature"):
        assert knob in err
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "1"  # round 1's checkpoint is kept
    second = [r for r in _rows(run_dir) if r["round"] == 2 and "rollout/tie_share" in r]
    assert [r["rollout/tie_share"] for r in second] == [1.0, 1.0]
    assert [r["rollout/round_tie_share"] for r in _rows(run_dir) if r["round"] == 2 and
            "rollout/round_tie_share" in r] == [1.0]


def test_format_score_is_checked(tiny_task, tmp_path):
    from spinlm.config import load_config
    from spinlm.config_check import check_config

    custom = tmp_path / "r.py"
    custom.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 1.0\n")
    problems = check_config(load_config(["preset=smoke", "reward.format_score=1.5"]))
    assert [p for p in problems if p.startswith("reward.format_score")] == [
        p for p in problems if p.startswith("reward.format_score=1.5")] != []
    problems = check_config(load_config(["preset=smoke", "reward.format_score=0.1", f"reward.custom_path={custom}"]))
    assert [p for p in problems if p.startswith("reward.format_score")] == [
        f"reward.format_score=0.1: applies to the built-in GSM8K reward only, not to reward.custom_path='{custom}' "
        "(score the format in your function)"]
