"""Tokenisation shared by generation, SFT and preference training, so all three see the same template.

A sequence is always ``prompt_ids + response_ids``: the prompt rendered with the chat template and the
generation prompt (exactly what the rollout engine is fed), then the response tokens followed by EOS (exactly
what the rollout engine emits before it stops). Nothing is ever re-rendered as a whole conversation.
"""
from __future__ import annotations

from spinlm.choices import TRUNCATION_MODES
from spinlm.data.example import DataError


def require_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: the tokenizer has no chat_template; spinlm renders prompts with it "
                        "(add a chat_template.jinja beside tokenizer_config.json, or point model.tokenizer_path at a "
                        "tokenizer that has one)")


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # some tokenizers return a batch of one
        ids = ids[0]
    return list(ids)


def encode_response(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id]


def cut_at_eos(ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS. Returns (ids, ended_with_eos)."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return list(ids[: i + 1]), True
    return list(ids), False


def truncate(ids: list[int], limit: int, mode: str, where: str, what: str) -> list[int] | None:
    """Apply data.truncation to one token list. Returns None when the row is to be dropped."""
    if limit < 1:
        raise DataError(f"{where}: a {what} limit of {limit} tokens; limits must be >= 1")
    if len(ids) <= limit:
        return ids
    if mode == "error":
        raise DataError(f"{where}: {what} has {len(ids)} tokens, over the limit of {limit} "
                        f"(data.truncation=error; use left, right or drop, or raise the limit)")
    if mode == "drop":
        return None
    if mode == "left":   # keep the end (for prompts: the question closest to the answer)
        return ids[-limit:]
    if mode == "right":
        return ids[:limit]
    raise DataError(f"data.truncation={mode!r}: expected {' | '.join(TRUNCATION_MODES)}")
