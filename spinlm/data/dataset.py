"""Examples -> token ids with the model's chat template (see spinlm.data.tokenize for the sequence layout)."""
from __future__ import annotations

from dataclasses import dataclass

from spinlm.choices import TRUNCATION_MODES
from spinlm.data.example import DataError, Example
from spinlm.data.tokenize import encode_prompt, encode_response, require_chat_template, truncate


@dataclass
class TokenizedExample:
    example: Example
    prompt_ids: list[int]
    response_ids: list[int] | None
    rejected_ids: list[int] | None


def _encode_prompt(tokenizer, ex: Example) -> list[int]:
    try:
        return encode_prompt(tokenizer, ex.prompt)
    except Exception as exc:  # jinja templates raise their own types (e.g. a role the template refuses)
        raise DataError(f"{ex.origin}: the chat template failed on this prompt "
                        f"({type(exc).__name__}: {exc})") from exc


def tokenize_examples(examples: list[Example], tokenizer, *, max_prompt_length: int, max_response_length: int,
                      truncation: str) -> tuple[list[TokenizedExample], dict]:
    """Tokenise prompts (rendered with the generation prompt) and responses (EOS appended).

    Prompts follow ``truncation`` as given (left keeps the end). Responses and rejected responses follow it for
    error and drop, and are otherwise always cut on the right: a response's start is what the prompt leads into.
    A dropped row counts once in ``dropped``, whichever part was too long, and in no truncation count;
    ``truncated_responses`` counts cut sequences (a row's response and rejected count separately).
    """
    if truncation not in TRUNCATION_MODES:
        raise DataError(f"data.truncation={truncation!r}: expected {' | '.join(TRUNCATION_MODES)}")
    for key, value in (("data.max_prompt_length", max_prompt_length),
                       ("data.max_response_length", max_response_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{key}={value!r}: expected a positive integer")
    require_chat_template(tokenizer, f"tokenizer {getattr(tokenizer, 'name_or_path', '') or '(unnamed)'}")
    response_mode = truncation if truncation in ("error", "drop") else "right"
    stats = {"truncated_prompts": 0, "truncated_responses": 0, "dropped": 0}
    out: list[TokenizedExample] = []
    for ex in examples:
        full = _encode_prompt(tokenizer, ex)
        prompt_ids = truncate(full, max_prompt_length, truncation, ex.origin, "prompt")
        if prompt_ids is None:
            stats["dropped"] += 1
            continue
        parts: dict[str, list[int] | None] = {"response": None, "rejected": None}
        dropped = False
        n_cut = 0
        for what, text in (("response", ex.response), ("rejected", ex.rejected)):
            if text is None:
                continue
            ids = encode_response(tokenizer, text)
            cut = truncate(ids, max_response_length, response_mode, ex.origin, what)
            if cut is None:
                dropped = True
                break
            n_cut += len(cut) < len(ids)
            parts[what] = cut
        if dropped:
            stats["dropped"] += 1
            continue
        stats["truncated_prompts"] += len(prompt_ids) < len(full)
        stats["truncated_responses"] += n_cut
        out.append(TokenizedExample(example=ex, prompt_ids=prompt_ids, response_ids=parts["response"],
                                    rejected_ids=parts["rejected"]))
    return out, stats
