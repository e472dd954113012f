"""Held-out accuracy: greedy answers scored by the reward function, overall and per data_source; pass@k of sampled ones."""
from __future__ import annotations

import math
from collections import defaultdict

from spinlm.rewards import score_responses
from spinlm.modeling import eos_ids_of
from spinlm.rollout.hf_rollout import SamplingParams, generate


def accuracy_metrics(items, responses: list[list[int]], tokenizer, reward_fn) -> dict[str, float]:
    """Score one greedy response per item: {"val/acc", "val/acc/<data_source>", "val/response_length"}."""
    scores = score_responses(reward_fn, items, tokenizer.batch_decode(responses, skip_special_tokens=True))
    by_source: dict[str, list[float]] = defaultdict(list)
    for it, s in zip(items, scores):
        by_source[it.example.data_source].append(s)
    metrics = {"val/acc": sum(scores) / max(len(scores), 1)}
    metrics.update({f"val/acc/{k}": sum(v) / len(v) for k, v in sorted(by_source.items())})
    metrics["val/response_length"] = sum(map(len, responses)) / max(len(responses), 1)
    return metrics


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which `correct` are right (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= correct <= n and 1 <= k <= n, got n={n}, correct={correct}, k={k}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - correct + 1, n + 1))


def sample_scores(items, responses: list[list[list[int]]], tokenizer, reward_fn) -> list[list[float]]:
    """The reward of every sampled response: [item][sample]."""
    flat = [(it, r) for it, rs in zip(items, responses) for r in rs]
    scores = score_responses(reward_fn, [it for it, _ in flat],
                             tokenizer.batch_decode([r for _, r in flat], skip_special_tokens=True))
    per_item, pos = [], 0
    for rs in responses:
        per_item.append(scores[pos : pos + len(rs)])
        pos += len(rs)
    return per_item


def evaluate_accuracy(model, tokenizer, items, reward_fn, *, max_new_tokens: int, batch_size: int = 64,
                      progress: bool = False) -> dict[str, float]:
    """Greedy answers of `model` to the items' prompts (TokenizedExamples), scored by the reward function."""
    rollout = generate(model, [it.prompt_ids for it in items], SamplingParams(max_new_tokens=max_new_tokens, greedy=True),
                       pad_id=tokenizer.pad_token_id, eos_ids=eos_ids_of(tokenizer, model), batch_size=batch_size,
                       desc="eval", progress=progress)
    return accuracy_metrics(items, [r[0] for r in rollout.responses], tokenizer, reward_fn)


def pass_at_k_metrics(items, samples: list[list[list[int]]], tokenizer, reward_fn, ks: list[int]) -> dict[str, float]:
    """pass@k for each k from n samples per item ([item][sample] -> token ids), overall and per data_source, and the
    mean reward of the samples (val/mean@n). A sample is right when its reward is > 0 (the rule rewards give 1 for a
    right answer and 0 otherwise). The trainer's val/pass@k is this with n = k."""
    per_item = sample_scores(items, samples, tokenizer, reward_fn)
    n_items = max(len(per_item), 1)
    metrics: dict[str, float] = {}
    for k in ks:
        values = [pass_at_k(len(s), sum(x > 0 for x in s), k) for s in per_item]
        metrics[f"val/pass@{k}"] = sum(values) / n_items
        by_source: dict[str, list[float]] = defaultdict(list)
        for it, v in zip(items, values):
            by_source[it.example.data_source].append(v)
        metrics.update({f"val/pass@{k}/{src}": sum(v) / len(v) for src, v in sorted(by_source.items())})
    n = max((len(s) for s in per_item), default=0)
    metrics[f"val/mean@{n}"] = sum(sum(s) / len(s) for s in per_item) / n_items
    return metrics


def evaluate_pass_at_k(model, tokenizer, items, reward_fn, *, n: int, ks: list[int], max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 1,
                       batch_size: int = 64, progress: bool = False) -> dict[str, float]:
    """n sampled answers per prompt (one prefill shared by the n samples), scored by the reward: pass@k. With the
    trainer's sampling settings, seed and batch size these are the draws behind its val/pass@k."""
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    rollout = generate(model, [it.prompt_ids for it in items], params, pad_id=tokenizer.pad_token_id,
                       eos_ids=eos_ids_of(tokenizer, model), batch_size=batch_size, seed=seed, desc="pass@k",
                       progress=progress)
    return pass_at_k_metrics(items, rollout.responses, tokenizer, reward_fn, ks)
