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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c are correct (Chen et al. 2021, the Codex paper):
    1 - C(n-c, k) / C(n, k), computed as a product so that large n does not overflow."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)) or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need integers 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every draw of k samples holds a correct one
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_k_metrics(items, samples: list[list[list[int]]], tokenizer, reward_fn, ks: list[int],
                      threshold: float = 1.0) -> dict[str, float]:
    """pass@k over items from n samples each ([item][sample] -> token ids); a sample passes when its reward is
    >= threshold. {"val/pass@k", "val/pass@k/<data_source>"} for each k."""
    flat = [(it, s) for it, group in zip(items, samples) for s in group]
    texts = tokenizer.batch_decode([s for _, s in flat], skip_special_tokens=True)
    scores = score_samples(reward_fn, [(it.example.data_source, t, it.example.ground_truth, it.example.extra_info,
                                        it.example.origin) for (it, _), t in zip(flat, texts)])
    per_item, pos = [], 0
    for group in samples:
        per_item.append((len(group), sum(s >= threshold for s in scores[pos : pos + len(group)])))
        pos += len(group)
    metrics: dict[str, float] = {}
    for k in ks:
        values = [pass_at_k(n, c, k) for n, c in per_item]
        metrics[f"val/pass@{k}"] = sum(values) / max(len(values), 1)
        by_source: dict[str, list[float]] = defaultdict(list)
        for it, v in zip(items, values):
            by_source[it.example.data_source].append(v)
        metrics.update({f"val/pass@{k}/{src}": sum(v) / len(v) for src, v in sorted(by_source.items())})
    return metrics


def evaluate_pass_at_k(model, tokenizer, items, reward_fn, *, n: int, ks: list[int], max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
                       threshold: float = 1.0, progress: bool = False) -> dict[str, float]:
    """n sampled answers per prompt (one prefill shared by the n samples), scored by the reward: pass@k."""
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    rollout = generate(model, [it.prompt_ids for it in items], params, pad_id=tokenizer.pad_token_id,
                       eos_ids=eos_ids_of(tokenizer, model), batch_size=batch_size, seed=seed, desc="pass@k",
                       progress=progress)
    return pass_at_k_metrics(items, rollout.responses, tokenizer, reward_fn, ks, threshold)
