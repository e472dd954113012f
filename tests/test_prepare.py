"""`spinlm prepare`: small fixture files in each public dataset's own layout, converted and read back through
spinlm's loader (and its reward, for GSM8K)."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spinlm.data.example import DataError
from spinlm.data.formats import load_examples
from spinlm.data.prepare import GSM8K_INSTRUCTION, prepare
from spinlm.rewards import get_reward_fn
from spinlm.config import load_config

GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
               "in April and May.\n#### 72"},
    {"question": "A shop sells 1,200 pens a day. How many in 2 days?",
     "answer": "1,200 * 2 = <<1200*2=2400>>2,400\n#### 2,400"},
]
ULTRACHAT = [
    {"prompt": "What is SPIN?", "prompt_id": "a1",
     "messages": [{"role": "user", "content": "What is SPIN?"}, {"role": "assistant", "content": "Self-play."},
                  {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Fine-tuning."}]},
    {"prompt": "Hi", "prompt_id": "b2",
     "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_gsm8k_round_trips_through_the_loader_and_the_reward(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", GSM8K)
    assert prepare("gsm8k", str(src), str(tmp_path / "gsm8k.parquet"), split="test") == 2
    rows = pq.read_table(tmp_path / "gsm8k.parquet").to_pylist()
    assert rows[0]["data_source"] == "openai/gsm8k"
    assert rows[0]["prompt"] == [{"role": "user", "content": f"{GSM8K[0]['question']} {GSM8K_INSTRUCTION}"}]
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["72", "2400"]  # commas dropped, as verl does
    assert rows[1]["extra_info"]["split"] == "test" and rows[1]["extra_info"]["index"] == 1

    examples, stats = load_examples(str(tmp_path / "gsm8k.parquet"))
    assert stats["files"][str(tmp_path / "gsm8k.parquet")]["format"] == "verl"
    assert [e.response for e in examples] == [r["answer"] for r in GSM8K]  # SPIN's chosen: the worked solution
    assert [e.ground_truth for e in examples] == ["72", "2400"]
    reward = get_reward_fn(load_config(["preset=smoke"]).reward)
    assert [reward(e.data_source, e.response, e.ground_truth, e.extra_info) for e in examples] == [1.0, 1.0]
    assert reward("openai/gsm8k", "#### 71", "72", {}) == 0.0


def test_ultrachat_takes_the_first_turns_as_spin_does(tmp_path):
    src = tmp_path / "ultra.parquet"
    pq.write_table(pa.Table.from_pylist(ULTRACHAT), src)
    assert prepare("ultrachat", str(src), str(tmp_path / "out.jsonl")) == 2
    examples, _ = load_examples(str(tmp_path / "out.jsonl"))
    assert [e.prompt for e in examples] == [[{"role": "user", "content": "What is SPIN?"}],
                                            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    assert [e.response for e in examples] == ["Self-play.", "Hello."]  # the first assistant turn, not the last
    assert [e.data_source for e in examples] == ["HuggingFaceH4/ultrachat_200k"] * 2
    assert [e.ground_truth for e in examples] == [None, None]
    assert examples[1].extra_info["prompt_id"] == "b2"


def test_messages_keep_their_own_source_and_ground_truth(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "#### 4"}],
             "data_source": "gsm8k", "reward_model": {"ground_truth": 4}},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}]
    src = tmp_path / "chat.json"
    src.write_text(json.dumps(rows))
    assert prepare("messages", str(src), str(tmp_path / "chat.parquet"), limit=2) == 2
    examples, _ = load_examples(str(tmp_path / "chat.parquet"), default_data_source="unused")
    assert [(e.data_source, e.ground_truth, e.response) for e in examples] == [("gsm8k", "4", "#### 4"),
                                                                                ("chat", None, "Ciao")]
    assert len(examples[1].prompt) == 3


@pytest.mark.parametrize("kind,row,expected", [
    ("gsm8k", {"question": "Q?", "answer": "just 5"}, "row 1: field 'answer': expected a worked solution ending in '#### <number>'"),
    ("gsm8k", {"question": "", "answer": "#### 5"}, "row 1: field 'question': expected a non-empty string"),
    ("gsm8k", {"answer": "#### 5"}, "row 1: field 'question': expected a string, got null"),
    ("ultrachat", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "row 1: field 'messages[1]': expected the first user turn to be answered by an 'assistant' turn"),
    ("ultrachat", {"messages": [{"role": "bot", "content": "a"}]}, "row 1: field 'messages[0].role': expected one of"),
    ("messages", {"messages": [{"role": "user", "content": "a"}]}, "row 1: field 'messages': expected at least one 'assistant'"),
])
def test_a_bad_row_is_named_by_file_row_and_field(tmp_path, kind, row, expected):
    good = GSM8K[0] if kind == "gsm8k" else ULTRACHAT[0]
    src = write_jsonl(tmp_path / "in.jsonl", [good, row])
    out = tmp_path / "out.parquet"
    with pytest.raises(DataError) as err:
        prepare(kind, str(src), str(out))
    assert str(err.value).startswith(f"{src}: {expected}")
    assert not out.exists()  # nothing half-written


def test_prepare_command(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", GSM8K)
    out = tmp_path / "gsm8k.parquet"
    cmd = [sys.executable, "-m", "spinlm.cli", "prepare", "gsm8k", "--input", str(src), "--output", str(out),
           "--instruction", "", "--limit", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"spinlm prepare gsm8k: wrote 1 rows to {out}"
    assert pq.read_table(out).to_pylist()[0]["prompt"][0]["content"] == GSM8K[0]["question"]
    bad = subprocess.run([*cmd[:7], "--output", str(tmp_path / "x.csv")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected a .parquet or .jsonl file name" in bad.stderr and "Traceback" not in bad.stderr
