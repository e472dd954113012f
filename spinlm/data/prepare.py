"""`spinlm prepare`: local files of public datasets -> verl-format rows that spinlm (and verl) read.

Every output row has data_source, prompt (a chat message list), ability, reward_model {style, ground_truth} and
extra_info {split, index, answer, ...}; extra_info.answer is the reference response, which SPIN trains towards.

- gsm8k: GSM8K's jsonl (question, answer = worked solution ending in "#### N"), as verl's gsm8k preprocessing
  does it: the question plus an instruction to end with "####", ground truth N (commas dropped).
- ultrachat: UltraChat 200k rows (messages), with the SPIN paper's recipe: the first user turn is the prompt and the
  first assistant turn is the real response. No rule reward applies (ground truth null).
- messages: any chat file (messages): the turns before the last assistant turn are the prompt, that turn the answer;
  a row's own data_source and reward_model are kept.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from spinlm.data.example import DataError
from spinlm.data.formats import BadRow, from_messages_row, message_list, read_rows, required_text

# verl's examples/data_preprocess/gsm8k.py appends exactly this to each question
GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
DATA_SOURCES = {"gsm8k": "openai/gsm8k", "ultrachat": "HuggingFaceH4/ultrachat_200k", "messages": "chat"}


def _gsm8k(row: dict, instruction: str) -> dict[str, Any]:
    question = required_text(row.get("question"), "question")
    answer = required_text(row.get("answer"), "answer")
    if "####" not in answer:
        raise BadRow("answer", "expected a worked solution ending in '#### <number>', found no '####'")
    final = answer.split("####")[-1].strip().replace(",", "")
    if not final:
        raise BadRow("answer", "nothing after the last '####' (expected the final number)")
    content = f"{question} {instruction}" if instruction else question
    return {"prompt": [{"role": "user", "content": content}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": final},
            "extra_info": {"answer": answer, "question": question}}


def _ultrachat(row: dict, instruction: str) -> dict[str, Any]:
    msgs = message_list(row.get("messages"), "messages")
    user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
    if user is None:
        raise BadRow("messages", "expected a 'user' turn, found none")
    if user + 1 >= len(msgs) or msgs[user + 1]["role"] != "assistant":
        raise BadRow(f"messages[{user + 1}]", "expected the first user turn to be answered by an 'assistant' turn")
    required_text(msgs[user]["content"], f"messages[{user}].content")
    answer = required_text(msgs[user + 1]["content"], f"messages[{user + 1}].content")
    extra = {"answer": answer}
    if isinstance(row.get("prompt_id"), str):
        extra["prompt_id"] = row["prompt_id"]
    return {"prompt": msgs[: user + 1], "ability": "chat", "reward_model": {"style": "model", "ground_truth": None},
            "extra_info": extra}


def _chat(row: dict, instruction: str) -> dict[str, Any]:
    chat = from_messages_row(row)  # the loader's own split: turns before the last assistant turn, and that turn
    rm = row.get("reward_model")
    ground_truth = rm.get("ground_truth") if isinstance(rm, dict) else None
    if ground_truth is not None and (isinstance(ground_truth, bool) or not isinstance(ground_truth, (str, int, float))):
        raise BadRow("reward_model.ground_truth", f"expected a string or a number, got {type(ground_truth).__name__}")
    out = {"prompt": chat.prompt, "ability": "chat",
           "reward_model": {"style": "rule" if ground_truth is not None else "model",
                            "ground_truth": None if ground_truth is None else str(ground_truth)},
           "extra_info": {"answer": chat.response}}
    if row.get("data_source") is not None:
        out["data_source"] = required_text(row["data_source"], "data_source")
    return out


CONVERTERS: dict[str, Callable[[dict, str], dict[str, Any]]] = {"gsm8k": _gsm8k, "ultrachat": _ultrachat,
                                                               "messages": _chat}


def prepare(kind: str, input_path: str, output_path: str, *, split: str = "train", limit: int | None = None,
            data_source: str | None = None, instruction: str = GSM8K_INSTRUCTION) -> int:
    """Convert input_path (parquet / jsonl / json) into output_path (.parquet or .jsonl); returns the row count.
    A bad row stops the conversion naming the file, the row and the field; nothing is written then."""
    if kind not in CONVERTERS:
        raise DataError(f"spinlm prepare {kind}: unknown dataset; expected one of {', '.join(CONVERTERS)}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit {limit}: expected a positive number of rows")
    out = Path(output_path)
    if out.suffix not in (".parquet", ".jsonl"):
        raise DataError(f"--output {output_path}: expected a .parquet or .jsonl file name")
    rows = read_rows(input_path)
    if not rows:
        raise DataError(f"{input_path}: the file has no rows")
    prepared = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        try:
            converted = CONVERTERS[kind](row, instruction)
        except BadRow as bad:
            raise DataError(f"{input_path}: row {i}: {bad} (spinlm prepare {kind})") from None
        source = data_source or converted.pop("data_source", None) or DATA_SOURCES[kind]
        converted.pop("data_source", None)
        converted["extra_info"] = {"split": split, "index": i, **converted["extra_info"]}
        prepared.append({"data_source": source, **converted})
    _write(prepared, out)
    return len(prepared)


def _write(rows: list[dict], out: Path) -> None:
    """Written under a temporary name and renamed: a failed conversion never leaves half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
