"""The `hf` rollout engine: batched, KV-cached generation with transformers' `generate`.

Prompts are sorted by length so each batch pads little; left padding; each response is cut after its first EOS,
so nothing after EOS is ever scored or trained on. Returned in the caller's order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from spinlm.data.tokenize import cut_at_eos


@dataclass
class SamplingParams:
    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass
class Rollout:
    responses: list[list[list[int]]]   # [prompt][sample] -> token ids, ending in EOS when ended[prompt][sample]
    ended: list[list[bool]]

    def flat(self) -> tuple[list[list[int]], list[bool]]:
        return [r for rs in self.responses for r in rs], [e for es in self.ended for e in es]


@torch.no_grad()
def generate(model, prompts: list[list[int]], params: SamplingParams, *, pad_id: int, eos_ids: set[int],
             batch_size: int = 64, seed: int | None = None, desc: str = "generate", progress: bool = True) -> Rollout:
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list = [None] * len(prompts)
    ended: list = [None] * len(prompts)
    n = 1 if params.greedy else params.n
    sampling = {} if params.greedy else dict(
        temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attn[row, width - len(prompts[i]) :] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=params.max_new_tokens,
            num_return_sequences=n, do_sample=not params.greedy, pad_token_id=pad_id, eos_token_id=sorted(eos_ids),
            use_cache=True, **sampling,
        )
        new = out[:, width:].tolist()
        for row, i in enumerate(idx):
            cut = [cut_at_eos(t, eos_ids) for t in new[row * n : (row + 1) * n]]
            responses[i] = [c[0] for c in cut]
            ended[i] = [c[1] for c in cut]
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return Rollout(responses, ended)
