"""Read the accepted data files (parquet, jsonl, json) and map each supported row format onto ``Example``.

Formats (detected from the columns, or forced with ``data.format``):

- ``spin``: SPIN's released data, ``real`` and ``generated`` message lists ending in an assistant turn.
- ``preference``: TRL's ``prompt`` + ``chosen`` + ``rejected``, each a string or a chat message list.
- ``messages``: chat SFT, ``messages`` = [..., {"role": "assistant", ...}].
- ``verl``: verl's RL format, ``prompt`` is a chat list; ``data_source``, ``reward_model``, ``extra_info``.
- ``plain``: ``prompt`` string, with a ``response`` string when the data has one.

Row indices in messages are 0-based positions among a file's rows; jsonl syntax errors name the 1-based line.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from spinlm.choices import DATA_FORMAT_CHOICES, DATA_FORMATS
from spinlm.data.example import DataError, Example

EXTENSIONS = (".parquet", ".jsonl", ".json")
ROLES = ("system", "user", "assistant")

# What each format needs, for the "unknown format" message.
FORMAT_NEEDS = {
    "spin": "columns 'real' and 'generated' (message lists)",
    "preference": "columns 'prompt', 'chosen' and 'rejected' (strings or message lists)",
    "messages": "column 'messages' (a message list ending in an assistant turn)",
    "verl": "column 'prompt' holding a message list (plus data_source, reward_model, extra_info)",
    "plain": "column 'prompt' holding a string (plus 'response', a string)",
}
REQUIRED_COLUMNS = {
    "spin": {"real", "generated"},
    "preference": {"prompt", "chosen", "rejected"},
    "messages": {"messages"},
    "verl": {"prompt"},
    "plain": {"prompt"},
}


class BadRow(Exception):
    """One row failed validation; the loader adds file and row and decides whether to skip it."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"field '{field}': {problem}")


# ----------------------------------------------------------------------------------------------- reading files

def _extension(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"{path}: unknown file extension {suffix or '(none)'!r}; expected one of "
                        f"{', '.join(EXTENSIONS)}")
    return suffix


def _check_readable(path: str) -> None:
    """Existence, kind, permissions and emptiness, without reading the contents."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; expected a data file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{path}: file is not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: file is empty")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _parse_jsonl_line(path: str, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: line {lineno}: expected a JSON object, got {_type_name(obj)}")
    return obj


def _rows_from_json(path: str, text: str) -> list[dict]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of row objects or {{\"data\": [...]}}, "
                        f"got {_type_name(obj)}")
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object, got {_type_name(row)}")
    return obj


def _open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc


def read_rows(path: str) -> list[dict]:
    """All rows of one parquet / jsonl / json file as plain dicts."""
    path = os.fspath(path)
    suffix = _extension(path)
    _check_readable(path)
    if suffix == ".parquet":
        pf = _open_parquet(path)
        try:
            return pf.read().to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read parquet data ({exc})") from exc
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    if suffix == ".json":
        return _rows_from_json(path, text)
    return [_parse_jsonl_line(path, n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _read_head(path: str) -> tuple[set[str], dict | None]:
    """Columns and the first row, reading as little as the file format allows."""
    suffix = _extension(path)
    _check_readable(path)
    if suffix == ".parquet":
        pf = _open_parquet(path)
        columns = set(pf.schema_arrow.names)
        try:
            batch = next(pf.iter_batches(batch_size=1), None)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read parquet data ({exc})") from exc
        first = batch.to_pylist()[0] if batch is not None and batch.num_rows else None
        return columns, first
    if suffix == ".jsonl":
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    if line.strip():
                        row = _parse_jsonl_line(path, lineno, line)
                        return set(row), row
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        raise DataError(f"{path}: file is empty")
    rows = read_rows(path)  # a JSON document has to be parsed whole
    return (set(rows[0]), rows[0]) if rows else (set(), None)


# ----------------------------------------------------------------------------------------------- detection

def detect_format(columns: set[str], first_row: dict, path: str) -> str:
    """The row format of a file, from its columns (and, for ``prompt``, the first row's prompt type)."""
    columns = set(columns)
    if {"real", "generated"} <= columns:
        return "spin"
    if {"chosen", "rejected"} <= columns and "prompt" in columns:
        return "preference"
    if "messages" in columns:
        return "messages"
    if "prompt" in columns:
        prompt = (first_row or {}).get("prompt")
        if isinstance(prompt, list):
            return "verl"
        if isinstance(prompt, str):
            return "plain"
        raise DataError(f"{path}: row 0: field 'prompt': expected a string (plain format) or a message list "
                        f"(verl format), got {_type_name(prompt)}; cannot detect the format")
    needs = "; ".join(f"{name}: {need}" for name, need in FORMAT_NEEDS.items())
    raise DataError(f"{path}: unknown data format; columns found: {sorted(columns)}. "
                    f"Each format needs - {needs} (or set data.format)")


def _resolve_format(fmt: str, columns: set[str], first_row: dict | None, path: str) -> str:
    if fmt == "auto":
        return detect_format(columns, first_row or {}, path)
    if fmt not in DATA_FORMATS:
        raise DataError(f"data.format={fmt!r}: expected {' | '.join(DATA_FORMAT_CHOICES)}")
    missing = REQUIRED_COLUMNS[fmt] - set(columns)
    if missing:
        raise DataError(f"{path}: data.format={fmt} needs {FORMAT_NEEDS[fmt]}; missing column(s) "
                        f"{sorted(missing)}; columns found: {sorted(columns)}")
    return fmt


# ----------------------------------------------------------------------------------------------- row validation

def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def required_text(value: Any, field: str) -> str:
    """A required, non-empty string."""
    if not isinstance(value, str):
        raise BadRow(field, f"expected a string, got {_type_name(value)}")
    if not value.strip():
        raise BadRow(field, "expected a non-empty string, got an empty one")
    return value


def message_list(value: Any, field: str) -> list[dict[str, str]]:
    """A non-empty list of {role, content} dicts with known roles; extra keys are dropped."""
    if not isinstance(value, list):
        raise BadRow(field, f"expected a list of {{role, content}} messages, got {_type_name(value)}")
    if not value:
        raise BadRow(field, "expected a non-empty list of messages, got an empty list")
    out = []
    for i, msg in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise BadRow(where, f"expected a {{role, content}} dict, got {_type_name(msg)}")
        role = msg.get("role")
        if not isinstance(role, str):
            raise BadRow(f"{where}.role", f"expected a string, got {_type_name(role)}")
        if role not in ROLES:
            raise BadRow(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        content = msg.get("content")
        if not isinstance(content, str):
            raise BadRow(f"{where}.content", f"expected a string, got {_type_name(content)}")
        out.append({"role": role, "content": content})
    return out


def _last_assistant(messages: list[dict[str, str]], field: str) -> str:
    """Content of the final turn, which must be a non-empty assistant turn."""
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise BadRow(f"{field}[{last}].role", f"expected the last turn to be 'assistant', "
                                               f"got {messages[last]['role']!r}")
    return required_text(messages[last]["content"], f"{field}[{last}].content")


def _prompt(value: Any, field: str) -> list[dict[str, str]]:
    """A prompt given as a string (one user turn) or as a message list."""
    if isinstance(value, str):
        return [{"role": "user", "content": required_text(value, field)}]
    if isinstance(value, list):
        return message_list(value, field)
    raise BadRow(field, f"expected a string or a message list, got {_type_name(value)}")


def _answer(value: Any, field: str) -> str:
    """A response given as a string or as a message list ending in the assistant turn (TRL)."""
    if isinstance(value, str):
        return required_text(value, field)
    if isinstance(value, list):
        return _last_assistant(message_list(value, field), field)
    raise BadRow(field, f"expected a string or a message list, got {_type_name(value)}")


def from_messages_row(row: dict) -> Example:
    """A ``messages`` row: the turns before the last assistant turn are the prompt, that turn the response."""
    msgs = message_list(row.get("messages"), "messages")
    idx = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if idx is None:
        raise BadRow("messages", "expected at least one 'assistant' turn, found none")
    if idx == 0:
        raise BadRow("messages", "expected prompt turns before the last 'assistant' turn, found none")
    return Example(prompt=msgs[:idx], response=required_text(msgs[idx]["content"], f"messages[{idx}].content"))


def _from_verl(row: dict) -> Example:
    prompt = message_list(row.get("prompt"), "prompt")
    if row.get("response") is not None:
        response = required_text(row["response"], "response")
    else:
        extra = row.get("extra_info")
        answer = extra.get("answer") if isinstance(extra, dict) else None
        response = required_text(answer, "extra_info.answer") if answer is not None else None
    return Example(prompt=prompt, response=response)


def _from_spin(row: dict) -> Example:
    real = message_list(row.get("real"), "real")
    generated = message_list(row.get("generated"), "generated")
    response = _last_assistant(real, "real")
    rejected = _last_assistant(generated, "generated")
    prompt = real[:-1]
    if not prompt:
        raise BadRow("real", "expected prompt turns before the last 'assistant' turn, found none")
    if len(generated) > 1 and generated[:-1] != prompt:
        raise BadRow("generated", "its turns before the last one differ from those of 'real' "
                                   "(the pair must share the prompt)")
    return Example(prompt=prompt, response=response, rejected=rejected)


def _from_preference(row: dict) -> Example:
    return Example(prompt=_prompt(row.get("prompt"), "prompt"), response=_answer(row.get("chosen"), "chosen"),
                   rejected=_answer(row.get("rejected"), "rejected"))


def _from_plain(row: dict) -> Example:
    prompt = [{"role": "user", "content": required_text(row.get("prompt"), "prompt")}]
    response = required_text(row["response"], "response") if "response" in row else None
    return Example(prompt=prompt, response=response)


_CONVERTERS: dict[str, Callable[[dict], Example]] = {
    "spin": _from_spin, "preference": _from_preference, "messages": from_messages_row,
    "verl": _from_verl, "plain": _from_plain,
}


def _ground_truth(row: dict) -> str | None:
    rm = row.get("reward_model")
    if rm is None:
        return None
    if not isinstance(rm, dict):
        raise BadRow("reward_model", f"expected a dict with 'ground_truth', got {_type_name(rm)}")
    gt = rm.get("ground_truth")
    if gt is None:
        return None
    if isinstance(gt, bool) or not isinstance(gt, (str, int, float)):
        raise BadRow("reward_model.ground_truth", f"expected a string or a number, got {_type_name(gt)}")
    if isinstance(gt, float) and not math.isfinite(gt):
        raise BadRow("reward_model.ground_truth", f"expected a finite number, got {gt}")
    return str(gt)


def _row_to_example(row: dict, fmt: str, default_data_source: str) -> Example:
    """Optional columns (data_source, reward_model, extra_info) that are null count as absent: parquet
    writes null where a row lacks a field that other rows have."""
    ex = _CONVERTERS[fmt](row)
    data_source = row.get("data_source")
    if data_source is None:
        ex.data_source = default_data_source
    else:
        ex.data_source = required_text(data_source, "data_source")
    ex.ground_truth = _ground_truth(row)
    extra = row.get("extra_info")
    if extra is not None and not isinstance(extra, dict):
        raise BadRow("extra_info", f"expected a dict, got {_type_name(extra)}")
    ex.extra_info = extra or {}
    return ex


# ----------------------------------------------------------------------------------------------- public API

def _as_path_list(paths: str | os.PathLike | Iterable) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        out = [os.fspath(paths)]
    else:
        out = [os.fspath(p) for p in paths]
    if not out:
        raise DataError("no data files given (data.train_files is empty)")
    return out


def load_examples(paths: str | list[str], fmt: str = "auto", *, skip_bad_rows: bool = False,
                  default_data_source: str = "") -> tuple[list[Example], dict]:
    """Every row of every file as an Example. Each file's format is detected on its own unless forced.

    Stats: rows (read), bad_rows_skipped, examples (kept), and per file its format and kept count.
    """
    examples: list[Example] = []
    stats: dict[str, Any] = {"rows": 0, "bad_rows_skipped": 0, "examples": 0, "files": {}}
    for path in _as_path_list(paths):
        rows = read_rows(path)
        if not rows:
            raise DataError(f"{path}: the file has no rows")
        file_fmt = _resolve_format(fmt, set().union(*rows), rows[0], path)
        kept = 0
        for i, row in enumerate(rows):
            try:
                ex = _row_to_example(row, file_fmt, default_data_source)
            except BadRow as bad:
                if not skip_bad_rows:
                    raise DataError(f"{path}: row {i}: {bad} ({file_fmt} format; set data.skip_bad_rows=true "
                                    f"to skip bad rows)") from None
                stats["bad_rows_skipped"] += 1
                continue
            ex.origin = f"{path}:{i}"
            examples.append(ex)
            kept += 1
        stats["rows"] += len(rows)
        if kept == 0:
            raise DataError(f"{path}: none of its {len(rows)} rows is usable ({file_fmt} format; "
                            f"all were skipped as bad rows)")
        stats["files"][path] = {"format": file_fmt, "rows": len(rows), "examples": kept}
    stats["examples"] = len(examples)
    return examples, stats


def _can_carry_response(fmt: str, columns: set[str], first_row: dict | None) -> bool:
    if fmt in ("spin", "preference", "messages"):
        return True
    if fmt == "plain":
        return "response" in columns
    row = first_row or {}
    extra = row.get("extra_info")
    return row.get("response") is not None or (isinstance(extra, dict) and extra.get("answer") is not None)


def check_file(path: str, fmt: str = "auto", need_response: bool = False) -> list[str]:
    """Cheap pre-flight check of one data file; returns problems (each naming the file), never raises for
    a bad file. Reads only the schema and first row (parquet) or the first line (jsonl)."""
    path = os.fspath(path)
    try:
        columns, first = _read_head(path)
        if first is None:
            return [f"{path}: the file has no rows"]
        found = _resolve_format(fmt, columns, first, path)
    except DataError as exc:
        return [str(exc)]
    if need_response and not _can_carry_response(found, columns, first):
        what = ("a 'response' column" if found == "plain"
                else "a 'response' column or extra_info.answer (checked in the first row)")
        return [f"{path}: algorithm.mode=spin needs a ground-truth response per prompt, but this {found}-format "
                f"file has none: it needs {what}"]
    return []
