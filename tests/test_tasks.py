"""The bundled tiny task: problem generator, row format, tokenizer, model and the cached, atomic build."""
from __future__ import annotations

import json
import os
import re

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from spinlm.errors import ConfigError
from spinlm.tasks.arith import generate_problems, to_rows
from spinlm.tasks.build import build_tiny_task
from spinlm.tasks.tiny_model import build_model, train_tokenizer

STEP = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)\.")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def check_problem(p: dict) -> list[tuple[int, str, int, int]]:
    """Re-derive a problem's answer from its solution text; returns the parsed steps."""
    body, marker, final = p["solution"].rpartition("\n#### ")
    assert marker, p["solution"]
    steps = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(body)]
    # Nothing in the solution body besides the equations, separated by single spaces.
    assert " ".join(f"{a}{op}{b}={c}." for a, op, b, c in steps) == body
    for i, (a, op, b, c) in enumerate(steps):
        assert OPS[op](a, b) == c, p
        assert c >= 0
        if i > 0:  # each step continues from the previous result
            assert a == steps[i - 1][3], p
            assert op != "*", p  # multiplication only opens a problem
    assert int(final) == steps[-1][3] == p["answer"] >= 0
    return steps


def test_same_seed_same_problems_and_different_seed_differs():
    a = generate_problems(300, seed=7)
    assert a == generate_problems(300, seed=7)
    assert a != generate_problems(300, seed=8)
    # A longer request extends the shorter one: the stream depends on the seed only.
    assert generate_problems(400, seed=7)[:300] == a


def test_every_solution_is_arithmetically_right_and_questions_are_distinct():
    problems = generate_problems(2000, seed=0)
    assert len(problems) == 2000
    assert len({p["question"] for p in problems}) == 2000
    n_steps = {len(check_problem(p)) for p in problems}
    assert n_steps == {1, 2, 3}
    assert any("*" in p["solution"] for p in problems)
    assert max(len(p["question"].split()) for p in problems) <= 40
    for p in problems:  # every operand of the solution is stated in the question
        numbers_in_question = [int(x) for x in re.findall(r"\d+", p["question"])]
        steps = check_problem(p)
        operands = [steps[0][0]] + [b for _, _, b, _ in steps]
        assert numbers_in_question == operands, p


def test_difficulty_knobs():
    problems = generate_problems(200, seed=3, min_steps=2, max_steps=2, max_number=9, allow_mul=False)
    for p in problems:
        steps = check_problem(p)
        assert len(steps) == 2
        assert all(op in "+-" for _, op, _, _ in steps)
        assert steps[0][0] <= 9 and all(b <= 9 for _, _, b, _ in steps)


def test_asking_for_more_distinct_problems_than_exist_is_an_error():
    # 16 names x 10 items x (4 add + 4 subtract verbs) with start 1 and operand 1: 1280 distinct questions.
    assert len(generate_problems(1280, seed=0, max_steps=1, max_number=1, allow_mul=False)) == 1280
    with pytest.raises(ValueError, match="could only find 1280 distinct problems"):
        generate_problems(1281, seed=0, max_steps=1, max_number=1, allow_mul=False)
    with pytest.raises(ValueError, match="min_steps=3, max_steps=2"):
        generate_problems(5, seed=0, min_steps=3, max_steps=2)


def test_rows_are_verl_format_plus_messages():
    problem = {"question": "Tom has 12 apples. He buys 7 more and gives away 5. How many apples does Tom have now?",
               "solution": "12+7=19. 19-5=14.\n#### 14", "answer": 14}
    check_problem(problem)
    rows = to_rows([problem, problem], "val")
    assert rows[1] == {
        "data_source": "tiny_arith",
        "prompt": [{"role": "user", "content": problem["question"]}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "14"},
        "extra_info": {"split": "val", "index": 1, "answer": "12+7=19. 19-5=14.\n#### 14"},
        "messages": [{"role": "user", "content": problem["question"]},
                     {"role": "assistant", "content": "12+7=19. 19-5=14.\n#### 14"}],
    }
    assert rows[0]["extra_info"]["index"] == 0


@pytest.fixture(scope="module")
def tokenizer():
    problems = generate_problems(300, seed=1)
    return train_tokenizer([f"{p['question']}\n{p['solution']}" for p in problems], vocab_size=300)


def test_tokenizer_round_trip_after_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Tom has 12 apples. He buys 7 more.", "46+43=89. 89-22=67.\n#### 67", "Zoë ate 3 pies!"]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
        assert reloaded.decode(ids) == text  # byte-level: even unseen characters survive
    messages = [{"role": "user", "content": "How many?"}]
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) \
        == "<|user|>How many?\n<|assistant|>"
    assert reloaded.apply_chat_template(messages + [{"role": "assistant", "content": "3"}], tokenize=False) \
        == "<|user|>How many?\n<|assistant|>3\n"
    assert reloaded.padding_side == "left"
    assert (reloaded.pad_token, reloaded.eos_token) == ("<pad>", "</s>")
    assert reloaded.convert_tokens_to_ids(["<pad>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]) \
        == [0, 1, 2, 3, 4]
    # Role markers are single tokens, also inside a rendered prompt.
    ids = reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == 2 and ids[-1] == 3


def test_digits_are_single_tokens(tokenizer):
    digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert len(set(digit_ids)) == 10
    ids = tokenizer("12345", add_special_tokens=False)["input_ids"]
    assert ids == [digit_ids[d] for d in (1, 2, 3, 4, 5)]
    ids = tokenizer("19-5=14", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["1", "9", "-", "5", "=", "1", "4"]


def test_model_size_seed_and_reload(tokenizer, tmp_path):
    model = build_model(tokenizer, seed=3)
    assert isinstance(model, LlamaForCausalLM)
    n = sum(p.numel() for p in model.parameters())
    assert 0.7e6 < n < 1.2e6
    assert model.config.vocab_size == len(tokenizer)
    gc = model.generation_config
    assert (gc.eos_token_id, gc.pad_token_id, gc.bos_token_id) == (1, 0, 1)

    state = torch.random.get_rng_state()
    same = build_model(tokenizer, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    other = build_model(tokenizer, seed=4)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[w], same.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])

    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ids = torch.tensor([tokenizer("Tom has 3 apples.")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reloaded(ids).logits, atol=1e-6)
    assert reloaded.generation_config.eos_token_id == 1


SMALL = dict(n_train=40, n_val=10, n_sft=20, sft_steps=3, sft_batch_size=4,
             model_kwargs=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))


def test_build_writes_a_complete_cached_task(tmp_path, caplog):
    out = build_tiny_task(tmp_path / "task", seed=5, **SMALL)
    assert out == (tmp_path / "task").resolve()
    names = {p.name for p in out.iterdir()}
    assert names == {"train.parquet", "val.parquet", "sft.parquet", "tokenizer", "init_model", "sft_model",
                     "build_info.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["task"]  # no temporary folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a normal folder, not a private temp dir
    train = pq.read_table(out / "train.parquet").to_pylist()
    val = pq.read_table(out / "val.parquet").to_pylist()
    sft = pq.read_table(out / "sft.parquet").to_pylist()
    assert (len(train), len(val), len(sft)) == (40, 10, 20)
    assert sft == train[:20]
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in val}
    assert train[0]["messages"][1]["content"] == train[0]["extra_info"]["answer"]
    info = json.loads((out / "build_info.json").read_text())
    assert info["seed"] == 5 and info["n_train"] == 40 and info["sft"]["steps"] == 3
    assert 0.0 <= info["sft"]["val_acc_after"] <= 1.0
    for folder in ("init_model", "sft_model"):
        AutoModelForCausalLM.from_pretrained(out / folder)
        assert AutoTokenizer.from_pretrained(out / folder).chat_template
    init = AutoModelForCausalLM.from_pretrained(out / "init_model").state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(out / "sft_model").state_dict()
    assert not torch.equal(init["model.norm.weight"], tuned["model.norm.weight"])

    # Cached: a second call returns at once and leaves the build untouched.
    mtime = (out / "build_info.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="spinlm"):
        assert build_tiny_task(out, seed=5, **SMALL) == out
        assert "complete build found" in caplog.text and "built with other" not in caplog.text
        caplog.clear()
        assert build_tiny_task(out, seed=6, **SMALL) == out  # still cached, but says the seed differs
        assert "it was built with other seed (use --force" in caplog.text
    assert (out / "build_info.json").stat().st_mtime_ns == mtime

    # Deterministic: a forced rebuild gives the same data and the same SFT weights.
    build_tiny_task(out, seed=5, force=True, **SMALL)
    assert pq.read_table(out / "train.parquet").to_pylist() == train
    again = AutoModelForCausalLM.from_pretrained(out / "sft_model").state_dict()
    assert all(torch.equal(tuned[k], again[k]) for k in tuned)
    assert json.loads((out / "build_info.json").read_text())["sft"]["final_loss"] == info["sft"]["final_loss"]


def test_failed_build_leaves_nothing_behind_and_foreign_folders_are_kept(tmp_path):
    with pytest.raises(ConfigError, match="sft.lr"):
        build_tiny_task(tmp_path / "task", **{**SMALL, "sft_lr": -1.0})
    assert list(tmp_path.iterdir()) == []

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tiny-task build"):
        build_tiny_task(foreign, **SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_two_processes_building_one_folder_build_it_once(tmp_path):
    """Two test workers (or two demos) starting on a missing task: one builds, the other waits and reuses it."""
    import subprocess
    import sys

    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
            "from spinlm.tasks.build import build_tiny_task; "
            f"build_tiny_task(sys.argv[1], seed=5, **{SMALL!r})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "task")], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("tiny task: building into" in log for log in logs) == 1, logs
    assert sum("complete build found" in log for log in logs) == 1, logs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]  # no lock file or half build left
