"""benchmarks/plateau_study.py writes RESULTS.md: its splits and its paired statistics must be what the write-up says."""
import importlib.util
import math
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(BENCHMARKS))  # the study imports quality.py's settings as a sibling script
    try:
        spec = importlib.util.spec_from_file_location("plateau_study", BENCHMARKS / "plateau_study.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_splits_are_disjoint_and_answer_only_rows_carry_no_solution(study, tmp_path):
    settings = dict(pass_steps=1, n_dev=10, task=dict(
        n_train=50, n_val=5, n_sft=15, min_steps=1, max_steps=1, max_number=9,
        model_kwargs=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)))
    paths = study.build_task(tmp_path, settings)
    prompts = {name: [row["prompt"][0]["content"] for row in pq.read_table(paths[name]).to_pylist()]
               for name in ("sft", "dev", "answer_only")}
    train = [row["prompt"][0]["content"] for row in pq.read_table(paths["task"] / "train.parquet").to_pylist()]
    assert prompts["sft"] == train[:15] and prompts["dev"] == train[-10:]
    assert prompts["answer_only"] == train[15:40]  # every train row outside the SFT and dev splits, in order
    answer_only = pq.read_table(paths["answer_only"])
    assert set(answer_only.column_names) == {"data_source", "prompt", "ability", "reward_model"}
    assert all(row["reward_model"]["ground_truth"] for row in answer_only.to_pylist())

    fresh = [row["prompt"][0]["content"] for row in pq.read_table(study.fresh_prompts(paths, 30)).to_pylist()]
    val = [row["prompt"][0]["content"] for row in pq.read_table(paths["test"]).to_pylist()]
    assert len(set(fresh)) == 30 and not set(fresh) & (set(train) | set(val))  # the confirmation's prompts are new


def test_answer_only_method_runs_only_where_a_task_asks_for_it(study):
    assert study.ANSWER_ONLY not in study.task_methods(study.TASKS["easy"])
    assert study.ANSWER_ONLY in study.task_methods(study.TASKS["small_sft"])
    assert study.task_methods(study.TASKS["small_sft"])[:len(study.task_methods(study.TASKS["easy"]))] == \
        study.task_methods(study.TASKS["easy"])


def test_paired_difference_by_hand(study):
    # 4 prompts, 2 seeds. Seed-averaged correctness: method (1, .5, .5, 0), baseline (.5, .5, 0, 0);
    # per-prompt differences (.5, 0, .5, 0): mean .25, sample SD sqrt(1/12), SE sqrt(1/12)/2.
    method = {1: "1110", 2: "1000"}
    base = {1: "1100", 2: "0000", 3: "1111"}  # seed 3 has no method run: left out of the pairing
    p = study.paired(method, base)
    assert p["seeds"] == [1, 2]
    assert p["diff"] == pytest.approx(0.25)
    assert p["se_prompts"] == pytest.approx(math.sqrt(1 / 12) / 2)
    assert p["per_seed"] == pytest.approx([0.25, 0.25])
    assert p["se_seeds"] == pytest.approx(0.0)
    assert study.paired(method, {3: "1111"}) == {"seeds": []}
