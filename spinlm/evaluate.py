"""Held-out accuracy: greedy answers scored by the reward function, overall and per data_source."""
from __future__ import annotations

from collections import defaultdict

from spinlm.rewards import score_samples
from spinlm.rollout.hf_rollout import SamplingParams, generate


def eos_ids_of(tokenizer, model=None) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return {i for i in ids if i is not None}


def accuracy_metrics(items, responses: list[list[int]], tokenizer, reward_fn) -> dict[str, float]:
    """Score one greedy response per item: {"val/acc", "val/acc/<data_source>", "val/response_length"}."""
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = score_samples(reward_fn, [(it.example.data_source, t, it.example.ground_truth, it.example.extra_info,
                                        it.example.origin) for it, t in zip(items, texts)])
    by_source: dict[str, list[float]] = defaultdict(list)
    for it, s in zip(items, scores):
        by_source[it.example.data_source].append(s)
    metrics = {"val/acc": sum(scores) / max(len(scores), 1)}
    metrics.update({f"val/acc/{k}": sum(v) / len(v) for k, v in sorted(by_source.items())})
    metrics["val/response_length"] = sum(map(len, responses)) / max(len(responses), 1)
    return metrics


def evaluate_accuracy(model, tokenizer, items, reward_fn, *, max_new_tokens: int, batch_size: int = 64,
                      progress: bool = False) -> dict[str, float]:
    """Greedy answers of `model` to the items' prompts (TokenizedExamples), scored by the reward function."""
    rollout = generate(model, [it.prompt_ids for it in items], SamplingParams(max_new_tokens=max_new_tokens, greedy=True),
                       pad_id=tokenizer.pad_token_id, eos_ids=eos_ids_of(tokenizer, model), batch_size=batch_size,
                       desc="eval", progress=progress)
    return accuracy_metrics(items, [r[0] for r in rollout.responses], tokenizer, reward_fn)
