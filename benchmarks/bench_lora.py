"""LoRA vs full fine-tuning in spinlm's online-DPO worker: peak memory and update tokens/s, side by side.

Both variants build the same randomly initialised Llama (two shapes: bench_update.py's "25m", where activations
dominate memory, and a 136M one on short sequences, where weights and optimizer state do) in a PolicyWorker as `spinlm train algorithm.mode=online_dpo` does, and run the same pairs through
`update` (which computes the opponent's log-probs first) for a few steps (the first is a warm-up). Full fine-tuning holds the
policy, a frozen opponent copy, gradients and AdamW state for every weight; LoRA (rank 16, all linear layers) holds
one model, and gradients and AdamW state for the adapter only. Each variant runs in its own subprocess, so peak RSS
is per variant.

    .venv/bin/python benchmarks/bench_lora.py [--rank 16] [--rounds 2] [--shapes 25m,136m] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_update import MODELS, build_model, make_pairs, word_tokenizer  # noqa: E402

SHAPES = {
    # GSM8K-like lengths on a small body: activations dominate memory
    "25m": dict(MODELS["25m"], steps=5),
    # a wider, deeper body on short sequences: weights, gradients and AdamW state dominate, as in a 1B+ model
    "136m": dict(vocab=32000, hidden=1024, layers=8, heads=16, inter=2816, tie=True,
                 prompt=(32, 64), response=(32, 64), batch=4, steps=5),
}


def child(variant: str, rank: int, shape: str) -> None:
    spec = SHAPES[shape]
    from spinlm.config import load_config, resolved
    from spinlm.pairs import Pairs
    from spinlm.workers.dp_actor import LossSettings
    from spinlm.workers.fsdp_workers import PolicyWorker

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(spec)
        model.save_pretrained(tmp)
        word_tokenizer(spec["vocab"]).save_pretrained(tmp)
        del model
        lora = [f"model.lora.rank={rank}", f"model.lora.alpha={2 * rank}"] if variant == "lora" else []
        cfg = resolved(load_config([f"model.path={tmp}", f"data.train_files={tmp}/unused.parquet",
                                    "algorithm.mode=online_dpo", "rollout.n=2", "trainer.device=cpu",
                                    f"actor.micro_batch_size={spec['batch']}", "actor.lr=1e-5", *lora]))
        worker = PolicyWorker(cfg, tmp, keep_opponent=True)
    prompts, chosen, rejected = make_pairs(spec)
    worker.start_schedule(spec["steps"])
    b = spec["batch"]
    times, tokens = [], []
    for s in range(spec["steps"]):
        idx = list(range(s * b, (s + 1) * b))
        pairs = Pairs([prompts[i] for i in idx], [chosen[i] for i in idx], [rejected[i] for i in idx])
        t = time.perf_counter()
        m = worker.update(pairs, LossSettings(beta=0.1), global_pairs=b)  # the opponent's log-probs computed inside
        times.append(time.perf_counter() - t)
        tokens.append(m["train/tokens"])
    trainable = sum(p.numel() for p in worker.policy.parameters() if p.requires_grad)
    print("RESULT " + json.dumps(dict(variant=variant, times=times, tokens=tokens, trainable=trainable,
                                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                      load_avg=os.getloadavg()[0])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--shapes", default="25m,136m", help="comma-separated subset of " + ",".join(SHAPES))
    p.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternated; the best median counts")
    p.add_argument("--json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.rank, args.shapes)
        return
    results = {shape: compare(shape, args.rank, args.rounds) for shape in args.shapes.split(",")}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def compare(shape: str, rank: int, rounds: int) -> dict:
    import torch

    spec = SHAPES[shape]
    print(f"[{shape}] {os.cpu_count()} cores, torch {torch.__version__}, model {spec['vocab']} vocab / hidden {spec['hidden']} / "
          f"{spec['layers']} layers, batch {spec['batch']} pairs, {spec['steps']} steps (first one a warm-up)")
    runs: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(rounds):
        for v in runs:
            proc = subprocess.run([sys.executable, __file__, "--child", v, "--rank", str(rank), "--shapes", shape],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{v} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            r = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
            step = statistics.median(r["times"][1:])
            r.update(median_step_s=step, tokens_per_s=statistics.mean(r["tokens"][1:]) / step)
            runs[v].append(r)
    best = {v: dict(min(rs, key=lambda r: r["median_step_s"]), peak_rss_mb=max(r["peak_rss_mb"] for r in rs))
            for v, rs in runs.items()}
    for v, r in best.items():
        print(f"[{shape}] {v:5s} trainable {r['trainable'] / 1e6:.2f}M  step {r['median_step_s']:.2f}s  "
              f"{r['tokens_per_s']:.0f} tok/s  peak RSS {r['peak_rss_mb']:.0f} MB  load {r['load_avg']:.1f}")
    f, lo = best["full"], best["lora"]
    print(f"[{shape}] lora vs full: peak RSS {lo['peak_rss_mb'] / f['peak_rss_mb']:.2f}x, tokens/s "
          f"{lo['tokens_per_s'] / f['tokens_per_s']:.2f}x")
    return best


if __name__ == "__main__":
    main()
