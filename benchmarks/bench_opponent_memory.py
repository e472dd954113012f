"""Peak memory of a SPIN round's learn phase: spinlm's one resident model (opponent log-probs precomputed as numbers)
vs keeping a second, frozen opponent model resident (the original SPIN code, TRL without precompute).

Each variant runs in its own subprocess (peak RSS is per process): load the policy, [copy it as the opponent],
compute the opponent's log-probs for the round's pairs, run optimizer steps. Prints peak RSS and the ratio.

    .venv/bin/python benchmarks/bench_opponent_memory.py [--hidden 512 --layers 8 --vocab 32000]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile

import torch


def child(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from spinlm.pairs import Pairs
    from spinlm.workers.dp_actor import DataParallelActor, LossSettings
    from spinlm.workers.logprobs import ResponseLogProbs

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=8, intermediate_size=args.hidden * 3,
                      max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg)
    opponent = None
    if args.variant == "two_models":
        opponent = LlamaForCausalLM(cfg)
        opponent.load_state_dict(model.state_dict())
        opponent.requires_grad_(False).eval()
    g = torch.Generator().manual_seed(1)
    n = 16
    prompts = [torch.randint(3, args.vocab, (64,), generator=g).tolist() for _ in range(n)]
    chosen = [torch.randint(3, args.vocab, (64,), generator=g).tolist() for _ in range(n)]
    rejected = [torch.randint(3, args.vocab, (64,), generator=g).tolist() for _ in range(n)]
    actor = DataParallelActor(ResponseLogProbs(model), micro_batch_size=4, max_tokens_per_micro_batch=None)
    ref = ResponseLogProbs(opponent) if opponent is not None else actor.module
    ref_c = actor.sequence_logps(prompts, chosen, module=ref)
    ref_r = actor.sequence_logps(prompts, rejected, module=ref)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for _ in range(2):
        actor.preference_step(Pairs(prompts, chosen, rejected), ref_c, ref_r, LossSettings(beta=0.1), opt, grad_clip=1.0)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"variant": args.variant, "params": params,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--variant", choices=["one_model", "two_models"])
    args = p.parse_args()
    if args.variant:
        return child(args)
    results = {}
    for variant in ("one_model", "two_models"):
        cmd = [sys.executable, __file__, "--variant", variant, "--hidden", str(args.hidden), "--layers",
               str(args.layers), "--vocab", str(args.vocab)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    one, two = results["one_model"], results["two_models"]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {one['params'] / 1e6:.1f}M parameters (fp32), 16 pairs of 64+64 tokens, AdamW, 2 steps")
    print(f"peak RSS  one resident model (spinlm spin mode): {one['peak_rss_mb']:.0f} MiB")
    print(f"peak RSS  policy + resident opponent:            {two['peak_rss_mb']:.0f} MiB")
    print(f"ratio one/two: {one['peak_rss_mb'] / two['peak_rss_mb']:.2f}  "
          f"(saved {two['peak_rss_mb'] - one['peak_rss_mb']:.0f} MiB = one fp32 copy of the weights, "
          f"{one['params'] * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
