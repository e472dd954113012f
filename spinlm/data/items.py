"""The one door data comes in by: the files a config names -> TokenizedExamples, for training, validation and SFT.

Every command reads its rows here (`spinlm train`, `spinlm sft`, `spinlm evaluate`), with the same ``data.*``
settings (format, bad-row policy, default data_source, lengths, truncation), so a row is the same item everywhere.
"""
from __future__ import annotations

from spinlm.data.dataset import TokenizedExample, tokenize_examples
from spinlm.data.formats import load_examples
from spinlm.errors import UserError


class MissingResponseError(UserError):
    """algorithm.mode=spin trains towards each prompt's ground-truth response, and some rows have none."""


def load_items(data_cfg, tokenizer, files, *, need_response: bool,
               limit: int | None = None) -> tuple[list[TokenizedExample], dict]:
    """The rows of ``files`` (a path or a list), read and tokenised as ``data_cfg`` (the ``data`` section) says.

    ``limit`` keeps the first rows read, before tokenising. ``need_response``: every row must carry a ground-truth
    response (spin's chosen side). Returns the items and the tokenisation stats (truncated and dropped counts).
    """
    d = data_cfg
    examples, _ = load_examples(files, d.format, skip_bad_rows=d.skip_bad_rows, default_data_source=d.default_data_source)
    if limit is not None:
        examples = examples[:limit]
    items, stats = tokenize_examples(examples, tokenizer, max_prompt_length=d.max_prompt_length,
                                     max_response_length=d.max_response_length, truncation=d.truncation)
    if need_response:
        missing = [it.example.origin for it in items if it.response_ids is None]
        if missing:
            raise MissingResponseError(
                f"algorithm.mode=spin needs a ground-truth response for every prompt; {len(missing)} rows have "
                f"none (first: {missing[0]}). Use a format with responses, or algorithm.mode=online_dpo")
    return items, stats


def load_val_items(data_cfg, tokenizer) -> list[TokenizedExample]:
    """The held-out prompts (``data.val_files``) that have a ground truth, the first ``data.val_max_samples`` of
    them: what the trainer's val/acc, `spinlm sft` and `spinlm evaluate` all score, so their accuracies agree."""
    items, _ = load_items(data_cfg, tokenizer, data_cfg.val_files, need_response=False)
    return [it for it in items if it.example.ground_truth is not None][: data_cfg.val_max_samples or None]
