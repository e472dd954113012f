"""Preference-update step time and tokens/s at 1 in-process rank vs 2 Ray ranks (gloo, FSDP2) on this CPU, and the
numerical agreement of the two (max abs difference of the loss per step and of the weights after the steps).

    .venv/bin/python benchmarks/scaling.py [--steps 6] [--hidden 128 --layers 4]

Uses the bundled tiny task's prompts and ground truths (chosen) with truncated copies as rejected.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from spinlm.config import load_config, resolved
from spinlm.data.items import load_items
from spinlm.tasks.build import build_tiny_task
from spinlm.pairs import Pairs
from spinlm.workers.dp_actor import LossSettings
from spinlm.modeling import load_tokenizer
from spinlm.workers.worker_group import LocalWorkerGroup, RayWorkerGroup

REPO = Path(__file__).resolve().parents[1]


def measure(group, pairs: Pairs, batch: int, steps: int) -> tuple[list[float], list[float], float]:
    ref_c = group.sequence_logps(pairs.prompts, pairs.chosen)
    ref_r = group.sequence_logps(pairs.prompts, pairs.rejected)
    group.start_schedule(steps)
    losses, times, tokens = [], [], 0.0
    for s in range(steps):
        idx = list(range(s * batch, (s + 1) * batch))
        start = time.perf_counter()
        m = group.update(pairs.select(idx), LossSettings(beta=0.5), ref=(ref_c[idx], ref_r[idx]))
        times.append(time.perf_counter() - start)
        losses.append(m["loss"])
        tokens = m["train/tokens"]
    return losses, times, tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    os.environ.setdefault("SPINLM_TINY_DIR", str(build_tiny_task(REPO / ".cache" / "tiny_task")))
    with tempfile.TemporaryDirectory() as tmp:
        base = ["preset=smoke", f"trainer.output_dir={tmp}", "actor.lr=1e-3", "actor.eps=1e-3", "actor.warmup_ratio=0",
                f"trainer.train_batch_size={args.batch}", "actor.micro_batch_size=8"]
        cfg = resolved(load_config(base))
        tok = load_tokenizer(cfg.model.path)
        items = load_items(cfg.data, tok, cfg.data.train_files, need_response=True)[0][: args.steps * args.batch]
        rejected = [it.response_ids[: max(1, len(it.response_ids) // 2)] + [tok.eos_token_id] for it in items]
        pairs = Pairs([it.prompt_ids for it in items], [it.response_ids for it in items], rejected)

        one = LocalWorkerGroup(cfg, cfg.model.path, keep_opponent=False)
        l1, t1, tok1 = measure(one, pairs, args.batch, args.steps)
        one.save(Path(tmp) / "one", with_optimizer=False)
        two = RayWorkerGroup(resolved(load_config([*base, "trainer.cpu_workers=2"])), cfg.model.path,
                             keep_opponent=False, run_dir=Path(tmp))
        try:
            l2, t2, tok2 = measure(two, pairs, args.batch, args.steps)
            two.save(Path(tmp) / "two", with_optimizer=False)
        finally:
            two.shutdown()
        w1, w2 = load_file(Path(tmp) / "one" / "model.safetensors"), load_file(Path(tmp) / "two" / "model.safetensors")
    # the first step of each side pays one-off warm-up costs: medians of the rest
    s1, s2 = statistics.median(t1[1:]), statistics.median(t2[1:])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; tiny task model "
          f"(0.91M params), {args.batch} pairs per step, {args.steps} steps")
    print(f"1 in-process rank : {s1:.3f} s/step, {tok1 / s1:,.0f} tokens/s")
    print(f"2 Ray ranks (gloo): {s2:.3f} s/step, {tok2 / s2:,.0f} tokens/s  (speed-up x{s1 / s2:.2f})")
    print(f"max |loss 1 rank - loss 2 ranks| over {args.steps} steps: {max(abs(a - b) for a, b in zip(l1, l2)):.2e}")
    print(f"max |weight difference| after {args.steps} steps: {max((w1[k] - w2[k]).abs().max().item() for k in w1):.2e}")


if __name__ == "__main__":
    main()
