"""Data formats and tokenisation, on real parquet / jsonl / json files and a real (tiny) tokenizer."""
from __future__ import annotations

import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spinlm.data.dataset import TokenizedExample, tokenize_examples
from spinlm.data.example import DataError, Example
from spinlm.data.formats import check_file, detect_format, load_examples, read_rows


def write(path, rows, ext: str | None = None) -> str:
    """Write rows as parquet, jsonl or json (by the file's extension)."""
    path = str(path)
    ext = ext or os.path.splitext(path)[1]
    if ext == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif ext == ".jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        with open(path, "w") as f:
            json.dump(rows, f)
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# Rows of every format and the Example each must become (origin, data_source filled in by the test).
FORMAT_CASES = {
    "messages": (
        [{"messages": [system("be brief"), user("1+1?"), assistant("2"), user("and 2+2?"), assistant("4")],
          "data_source": "gsm8k", "reward_model": {"ground_truth": "4", "style": "rule"},
          "extra_info": {"split": "train", "index": 0}}],
        Example(prompt=[system("be brief"), user("1+1?"), assistant("2"), user("and 2+2?")], response="4",
                data_source="gsm8k", ground_truth="4", extra_info={"split": "train", "index": 0}),
    ),
    "verl": (
        [{"prompt": [user("What is 3+4?")], "data_source": "openai/gsm8k",
          "reward_model": {"ground_truth": "7", "style": "rule"},
          "extra_info": {"answer": "3+4=7\n#### 7", "index": 3}}],
        Example(prompt=[user("What is 3+4?")], response="3+4=7\n#### 7", data_source="openai/gsm8k",
                ground_truth="7", extra_info={"answer": "3+4=7\n#### 7", "index": 3}),
    ),
    "spin": (
        [{"real": [user("hi"), assistant("hello there")], "generated": [user("hi"), assistant("hey")]}],
        Example(prompt=[user("hi")], response="hello there", rejected="hey", data_source="dflt"),
    ),
    "preference": (
        [{"prompt": "Sky colour?", "chosen": "blue", "rejected": "green"}],
        Example(prompt=[user("Sky colour?")], response="blue", rejected="green", data_source="dflt"),
    ),
    "plain": (
        [{"prompt": "2+2=", "response": "4", "reward_model": {"ground_truth": 4}}],
        Example(prompt=[user("2+2=")], response="4", data_source="dflt", ground_truth="4"),
    ),
}


@pytest.mark.parametrize("ext", [".parquet", ".jsonl", ".json"])
@pytest.mark.parametrize("fmt", list(FORMAT_CASES))
def test_every_format_from_every_file_type(tmp_path, fmt, ext):
    rows, expected = FORMAT_CASES[fmt]
    path = write(tmp_path / f"train{ext}", rows)
    for forced in ("auto", fmt):
        examples, stats = load_examples(path, forced, default_data_source="dflt")
        expected.origin = f"{path}:0"
        assert examples == [expected]
        assert stats["rows"] == 1 and stats["bad_rows_skipped"] == 0 and stats["examples"] == 1
        assert stats["files"][path]["format"] == fmt


def test_preference_conversational_and_json_data_key(tmp_path):
    rows = [{"prompt": [system("s"), user("q")], "chosen": [assistant("good")], "rejected": [assistant("bad")],
             "data_source": "exact_match"}]
    path = tmp_path / "pref.json"
    path.write_text(json.dumps({"data": rows}))
    (ex,), _ = load_examples(str(path))
    assert ex == Example(prompt=[system("s"), user("q")], response="good", rejected="bad",
                         data_source="exact_match", origin=f"{path}:0")


def test_verl_response_column_wins_and_missing_answer_gives_none(tmp_path):
    rows = [{"prompt": [user("a")], "response": "from column", "extra_info": {"answer": "from extra"}},
            {"prompt": [user("b")], "response": None, "extra_info": {"answer": "from extra"}},
            {"prompt": [user("c")], "response": None, "extra_info": {"index": 2}}]
    path = write(tmp_path / "v.parquet", rows)
    examples, _ = load_examples(path)
    assert [e.response for e in examples] == ["from column", "from extra", None]


def test_several_files_each_detected_and_origins(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"prompt": "p0", "response": "r0"}, {"prompt": "p1", "response": "r1"}])
    b = write(tmp_path / "b.parquet", [{"messages": [user("m"), assistant("n")], "data_source": "math"}])
    examples, stats = load_examples([a, b], default_data_source="tiny_arith")
    assert [e.origin for e in examples] == [f"{a}:0", f"{a}:1", f"{b}:0"]
    assert [e.data_source for e in examples] == ["tiny_arith", "tiny_arith", "math"]
    assert stats["rows"] == 3 and stats["examples"] == 3
    assert stats["files"][a]["format"] == "plain" and stats["files"][b]["format"] == "messages"


def test_plain_without_response_column_has_no_response(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "q", "reward_model": {"ground_truth": "19.5"}}])
    (ex,), _ = load_examples(path)
    assert ex.response is None and ex.ground_truth == "19.5"


def test_forced_format_missing_columns(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "q", "response": "r"}])
    with pytest.raises(DataError, match=re.escape(f"{path}: data.format=spin needs")) as info:
        load_examples(path, "spin")
    assert "['generated', 'real']" in str(info.value) and "['prompt', 'response']" in str(info.value)
    with pytest.raises(DataError, match="data.format='sft'"):
        load_examples(path, "sft")


def test_detect_format_rules_and_unknown():
    assert detect_format({"real", "generated", "prompt"}, {}, "f") == "spin"
    assert detect_format({"prompt", "chosen", "rejected"}, {"prompt": "x"}, "f") == "preference"
    assert detect_format({"messages", "prompt"}, {"prompt": "x"}, "f") == "messages"
    assert detect_format({"prompt"}, {"prompt": [user("x")]}, "f") == "verl"
    assert detect_format({"prompt", "response"}, {"prompt": "x"}, "f") == "plain"
    with pytest.raises(DataError) as info:
        detect_format({"question", "answer"}, {"question": "q"}, "data/x.jsonl")
    msg = str(info.value)
    assert msg.startswith("data/x.jsonl: unknown data format; columns found: ['answer', 'question']")
    for needed in ("'real' and 'generated'", "'chosen'", "'messages'", "message list", "'response'"):
        assert needed in msg
    with pytest.raises(DataError, match="row 0: field 'prompt': expected a string .* got int"):
        detect_format({"prompt"}, {"prompt": 5}, "f")


BAD_ROWS = [
    ("messages", {"messages": [user("a"), assistant("b"), {"role": "user", "content": 5}]},
     "field 'messages[2].content': expected a string, got int"),
    ("messages", {"messages": "hello"}, "field 'messages': expected a list of {role, content} messages, got str"),
    ("messages", {"messages": None}, "field 'messages': expected a list of {role, content} messages, got null"),
    ("messages", {"messages": []}, "field 'messages': expected a non-empty list"),
    ("messages", {"messages": [user("a"), "b"]}, "field 'messages[1]': expected a {role, content} dict, got str"),
    ("messages", {"messages": [{"role": "tool", "content": "x"}, assistant("b")]},
     "field 'messages[0].role': expected one of system, user, assistant, got 'tool'"),
    ("messages", {"messages": [{"content": "x"}, assistant("b")]},
     "field 'messages[0].role': expected a string, got null"),
    ("messages", {"messages": [user("a"), user("b")]}, "field 'messages': expected at least one 'assistant' turn"),
    ("messages", {"messages": [assistant("b")]}, "field 'messages': expected prompt turns before"),
    ("messages", {"messages": [user("a"), assistant("  ")]},
     "field 'messages[1].content': expected a non-empty string"),
    ("plain", {"prompt": "", "response": "r"}, "field 'prompt': expected a non-empty string"),
    ("plain", {"prompt": "q", "response": ""}, "field 'response': expected a non-empty string"),
    ("plain", {"prompt": "q", "response": 7}, "field 'response': expected a string, got int"),
    ("plain", {"prompt": "q", "response": "r", "data_source": 3}, "field 'data_source': expected a string, got int"),
    ("plain", {"prompt": "q", "response": "r", "reward_model": "7"},
     "field 'reward_model': expected a dict with 'ground_truth', got str"),
    ("plain", {"prompt": "q", "response": "r", "reward_model": {"ground_truth": [1]}},
     "field 'reward_model.ground_truth': expected a string or a number, got list"),
    ("plain", {"prompt": "q", "response": "r", "extra_info": [1]}, "field 'extra_info': expected a dict, got list"),
    ("verl", {"prompt": [user("q")], "response": ""}, "field 'response': expected a non-empty string"),
    ("verl", {"prompt": [user("q")], "extra_info": {"answer": 7}},
     "field 'extra_info.answer': expected a string, got int"),
    ("spin", {"real": [user("q"), assistant("a")], "generated": [user("q"), user("z")]},
     "field 'generated[1].role': expected the last turn to be 'assistant', got 'user'"),
    ("spin", {"real": [assistant("a")], "generated": [assistant("z")]}, "field 'real': expected prompt turns before"),
    ("spin", {"real": [user("q"), assistant("a")], "generated": [user("other"), assistant("z")]},
     "field 'generated': its turns before the last one differ from those of 'real'"),
    ("preference", {"prompt": "q", "chosen": "a", "rejected": None},
     "field 'rejected': expected a string or a message list, got null"),
    ("preference", {"prompt": "q", "chosen": [user("a")], "rejected": "b"},
     "field 'chosen[0].role': expected the last turn to be 'assistant', got 'user'"),
]
GOOD_ROW = {
    "messages": {"messages": [user("a"), assistant("b")]},
    "plain": {"prompt": "q", "response": "r"},
    "verl": {"prompt": [user("q")], "response": "r"},
    "spin": {"real": [user("q"), assistant("a")], "generated": [user("q"), assistant("z")]},
    "preference": {"prompt": "q", "chosen": "a", "rejected": "b"},
}


@pytest.mark.parametrize("fmt,bad,expected", BAD_ROWS, ids=[e for _, _, e in BAD_ROWS])
def test_bad_row_names_file_row_and_field(tmp_path, fmt, bad, expected):
    path = write(tmp_path / "train.jsonl", [GOOD_ROW[fmt], GOOD_ROW[fmt], bad])
    with pytest.raises(DataError) as info:
        load_examples(path, fmt)
    assert str(info.value).startswith(f"{path}: row 2: {expected}")
    examples, stats = load_examples(path, fmt, skip_bad_rows=True)
    assert len(examples) == 2 and stats == {**stats, "rows": 3, "bad_rows_skipped": 1, "examples": 2}


def test_skip_bad_rows_counts_and_all_bad_is_an_error(tmp_path):
    rows = [{"prompt": "q0", "response": "r"}, {"prompt": "q1", "response": 1}, {"prompt": "", "response": "r"},
            {"prompt": "q3", "response": "r"}]
    path = write(tmp_path / "t.jsonl", rows)
    examples, stats = load_examples(path, skip_bad_rows=True)
    assert [e.origin for e in examples] == [f"{path}:0", f"{path}:3"]
    assert stats["rows"] == 4 and stats["bad_rows_skipped"] == 2
    all_bad = write(tmp_path / "bad.jsonl", [{"prompt": "q", "response": 1}, {"prompt": "q", "response": ""}])
    with pytest.raises(DataError, match=re.escape(f"{all_bad}: none of its 2 rows is usable")):
        load_examples(all_bad, skip_bad_rows=True)


def test_broken_jsonl_line_is_named_even_when_skipping(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n')
    with pytest.raises(DataError, match=re.escape(f"{path}: line 3: invalid JSON")):
        load_examples(str(path), skip_bad_rows=True)
    path.write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}: line 2: expected a JSON object, got list")):
        read_rows(str(path))


def test_blank_jsonl_lines_are_not_rows(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('\n{"prompt": "a", "response": "b"}\n   \n{"prompt": "c", "response": "d"}\n')
    assert read_rows(str(path)) == [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]


def test_file_level_errors(tmp_path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(DataError, match=re.escape(f"{missing}: file not found")):
        read_rows(missing)
    for name in ("empty.jsonl", "empty.parquet", "empty.json"):
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: file is empty")):
            read_rows(str(tmp_path / name))
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="blank.jsonl: file is empty"):
        read_rows(str(tmp_path / "blank.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown file extension '\.csv'; expected one of .parquet"):
        read_rows(str(tmp_path / "d.csv"))
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(DataError, match="dir.json: is a directory"):
        read_rows(str(tmp_path / "dir.json"))
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of row objects .* got dict"):
        read_rows(str(tmp_path / "obj.json"))
    (tmp_path / "bad.parquet").write_text("not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet file"):
        read_rows(str(tmp_path / "bad.parquet"))
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(DataError, match=r"none\.json: the file has no rows"):
        load_examples(str(tmp_path / "none.json"))
    with pytest.raises(DataError, match="no data files given"):
        load_examples([])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    path = write(tmp_path / "t.jsonl", [{"prompt": "q", "response": "r"}])
    os.chmod(path, 0)
    with pytest.raises(DataError, match="permission denied"):
        read_rows(path)
    assert "permission denied" in check_file(path)[0]


def test_check_file(tmp_path):
    good = write(tmp_path / "good.parquet", [{"messages": [user("a"), assistant("b")]}] * 3)
    assert check_file(good) == [] and check_file(good, need_response=True) == []
    assert check_file(good, "messages") == []

    # verl: the response can come from extra_info.answer in the first row, or not at all
    with_answer = write(tmp_path / "va.parquet", [{"prompt": [user("q")], "extra_info": {"answer": "#### 1"}}])
    no_answer = write(tmp_path / "vn.jsonl", [{"prompt": [user("q")], "extra_info": {"index": 0}}])
    assert check_file(with_answer, need_response=True) == []
    assert check_file(no_answer) == []
    (problem,) = check_file(no_answer, need_response=True)
    assert problem.startswith(f"{no_answer}: ") and "extra_info.answer" in problem and "verl" in problem
    prompt_only = write(tmp_path / "p.json", [{"prompt": "q"}])
    (problem,) = check_file(prompt_only, need_response=True)
    assert "plain" in problem and "'response' column" in problem

    assert check_file(str(tmp_path / "missing.jsonl")) == [f"{tmp_path / 'missing.jsonl'}: file not found"]
    (tmp_path / "e.jsonl").write_text("")
    assert check_file(str(tmp_path / "e.jsonl")) == [f"{tmp_path / 'e.jsonl'}: file is empty"]
    unknown = write(tmp_path / "u.jsonl", [{"question": "q"}])
    (problem,) = check_file(unknown)
    assert problem.startswith(f"{unknown}: unknown data format; columns found: ['question']")
    (problem,) = check_file(good, "preference")
    assert "data.format=preference needs" in problem
    assert check_file(str(tmp_path / "x.txt"))[0].startswith(f"{tmp_path / 'x.txt'}: unknown file extension")
    empty_table = str(tmp_path / "zero.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty_table)
    assert check_file(empty_table) == [f"{empty_table}: the file has no rows"]


def test_check_file_reads_only_the_head(tmp_path):
    # the second jsonl line is broken: the cheap check does not reach it, the full load does
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{broken\n')
    assert check_file(str(path)) == []
    with pytest.raises(DataError, match="line 2"):
        load_examples(str(path))


# ----------------------------------------------------------------------------------------------- tokenisation

WORDS = ["<pad>", "</s>", "<unk>", "SYSTEM:", "USER:", "ASSISTANT:", "one", "two", "three", "four", "five", "six"]
ID = {w: i for i, w in enumerate(WORDS)}
TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def make_tokenizer(chat_template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a fixed vocabulary, so token ids can be written down by hand."""
    tok = Tokenizer(models.WordLevel(vocab=ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   chat_template=chat_template)


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def ex(prompt: str, response: str | None = None, rejected: str | None = None, row: int = 0) -> Example:
    return Example(prompt=[user(prompt)], response=response, rejected=rejected, origin=f"train.jsonl:{row}")


def test_tokenize_exact_ids():
    tok = make_tokenizer()
    example = Example(prompt=[system("six"), user("one two")], response="three four", rejected="five",
                      origin="t:0")
    (out,), stats = tokenize_examples([example], tok, max_prompt_length=16, max_response_length=16,
                                      truncation="error")
    assert isinstance(out, TokenizedExample) and out.example is example
    assert out.prompt_ids == ids("SYSTEM: six USER: one two ASSISTANT:")
    assert out.prompt_ids == tok.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)
    assert out.response_ids == ids("three four </s>") and out.response_ids[-1] == tok.eos_token_id
    assert out.rejected_ids == ids("five </s>")
    assert stats == {"truncated_prompts": 0, "truncated_responses": 0, "dropped": 0}
    (no_resp,), _ = tokenize_examples([ex("one")], tok, max_prompt_length=16, max_response_length=16,
                                      truncation="error")
    assert no_resp.response_ids is None and no_resp.rejected_ids is None


def test_truncation_modes():
    tok = make_tokenizer()
    # prompt: USER: one two three four five ASSISTANT: (7 tokens); response: six five four three </s> (5)
    rows = [ex("one two three four five", "six five four three"), ex("one", "two", row=1)]
    kw = dict(max_prompt_length=4, max_response_length=3)

    out, stats = tokenize_examples(rows, tok, truncation="left", **kw)
    assert out[0].prompt_ids == ids("three four five ASSISTANT:")
    assert out[0].response_ids == ids("six five four")  # responses always keep the start
    assert out[1].prompt_ids == ids("USER: one ASSISTANT:") and out[1].response_ids == ids("two </s>")
    assert stats == {"truncated_prompts": 1, "truncated_responses": 1, "dropped": 0}

    out, stats = tokenize_examples(rows, tok, truncation="right", **kw)
    assert out[0].prompt_ids == ids("USER: one two three")
    assert out[0].response_ids == ids("six five four")
    assert stats == {"truncated_prompts": 1, "truncated_responses": 1, "dropped": 0}

    out, stats = tokenize_examples(rows, tok, truncation="drop", **kw)
    assert [t.example.origin for t in out] == ["train.jsonl:1"]
    assert stats == {"truncated_prompts": 0, "truncated_responses": 0, "dropped": 1}

    # only the rejected response is too long: drop still drops the row
    out, stats = tokenize_examples([ex("one", "two", "three four five six")], tok, truncation="drop", **kw)
    assert out == [] and stats["dropped"] == 1

    with pytest.raises(DataError, match=re.escape("train.jsonl:0: prompt has 7 tokens, over the limit of 4")):
        tokenize_examples(rows, tok, truncation="error", **kw)
    with pytest.raises(DataError, match=re.escape("train.jsonl:1: response has 3 tokens, over the limit of 2")):
        tokenize_examples([ex("one", "two three", row=1)], tok, truncation="error", max_prompt_length=4,
                          max_response_length=2)


def test_tokenize_rejects_bad_settings_and_missing_template():
    rows = [ex("one", "two")]
    with pytest.raises(DataError, match="no chat_template"):
        tokenize_examples(rows, make_tokenizer(None), max_prompt_length=8, max_response_length=8, truncation="error")
    with pytest.raises(DataError, match="data.truncation='middle'"):
        tokenize_examples(rows, make_tokenizer(), max_prompt_length=8, max_response_length=8, truncation="middle")
    with pytest.raises(DataError, match="data.max_response_length=0: expected a positive integer"):
        tokenize_examples(rows, make_tokenizer(), max_prompt_length=8, max_response_length=0, truncation="left")


def test_template_failure_names_the_row():
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}" \
             "{{ m['content'] }} {% endfor %}"
    row = Example(prompt=[system("six"), user("one")], response="two", origin="data.jsonl:5")
    with pytest.raises(DataError, match=re.escape("data.jsonl:5: the chat template failed on this prompt")):
        tokenize_examples([row], make_tokenizer(strict), max_prompt_length=8, max_response_length=8,
                          truncation="error")
