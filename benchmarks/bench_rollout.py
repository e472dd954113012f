"""Rollout throughput: spinlm's `hf` engine vs plain `model.generate(num_return_sequences=n, do_sample=True)`.

Both sides get the same prompts (sorted by length, left-padded, one batch of 64), the same sampling settings
(temperature 1, top-k and top-p off) and the same EOS set, and return n samples per prompt. Throughput is new tokens
per second, counting only real tokens (each sample cut after its first EOS). Runs are interleaved (the side that goes
first alternates), so load from other jobs on the machine hits both sides alike; medians are reported.

Random weights: to make response lengths vary as they do in self-play, EOS is a set of token ids, a fraction
--stop-prob of the vocabulary, so a sample ends with about that probability per step (the random model's next-token
distribution is close to uniform); the default 1/24 gives a mean length near 24 of 64. --stop-prob 0: no EOS, every
sample runs to max_new_tokens (what is left is the shared prefill alone).

    .venv/bin/python benchmarks/bench_rollout.py [--models tiny large] [--runs 5] [--n 4] [--max-new-tokens 64]
                                                 [--stop-prob 0.0417] [--threads T]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

# As the spinlm command does (spinlm/cli.py): spinning OpenMP threads stall badly when other jobs share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after OMP_WAIT_POLICY)
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from spinlm.data.tokenize import cut_at_eos  # noqa: E402
from spinlm.rollout.hf_rollout import SamplingParams, generate  # noqa: E402

PAD = 0
SHAPES = {
    # The bundled tiny task's model (spinlm/tasks/tiny_model.py): ~1M parameters, tied embeddings.
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=384, tie_word_embeddings=True),
    # A small real-vocabulary model: tied 32k embeddings, 8 layers of width 512.
    "large": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, intermediate_size=1024, tie_word_embeddings=True),
}


def build(shape: str) -> LlamaForCausalLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, pad_token_id=PAD, bos_token_id=None,
                                             eos_token_id=None, **SHAPES[shape]))
    model.generation_config.eos_token_id = None   # the EOS set is passed explicitly to both sides
    return model.eval()


def make_prompts(vocab: int, count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 65, (count,), generator=g).tolist()
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def plain_generate(model, prompts, n: int, max_new_tokens: int, eos_ids: set[int]) -> list[list[int]]:
    """The baseline, as the engine used it before: one left-padded, length-sorted batch through `generate`."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(order):
        ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
        mask[row, width - len(prompts[i]) :] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_return_sequences=n,
                         do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=PAD,
                         eos_token_id=sorted(eos_ids) or None, use_cache=True)
    return [cut_at_eos(row, eos_ids)[0] for row in out[:, width:].tolist()]


def spinlm_generate(model, prompts, n: int, max_new_tokens: int, eos_ids: set[int], seed: int) -> list[list[int]]:
    rollout = generate(model, prompts, SamplingParams(n=n, max_new_tokens=max_new_tokens), pad_id=PAD,
                       eos_ids=eos_ids, batch_size=len(prompts), seed=seed, progress=False)
    return rollout.flat()[0]


def timed(fn) -> tuple[float, float, list[list[int]]]:
    """Wall-clock and CPU seconds (all of this process's threads). CPU time is the steadier of the two when other
    jobs share the machine: it counts only the work done, not the time spent waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    rows = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, rows


def bench(shape: str, args) -> None:
    model = build(shape)
    vocab = model.config.vocab_size
    eos_ids = set(range(1, 1 + round(vocab * args.stop_prob)))
    prompts = make_prompts(vocab, args.prompts, seed=1)
    params = sum(p.numel() for p in model.parameters())
    print(f"\n## {shape}: {params / 1e6:.1f}M parameters, vocab {vocab}, hidden {model.config.hidden_size}, "
          f"{model.config.num_hidden_layers} layers; {len(prompts)} prompts of 16-64 tokens, n={args.n}, "
          f"max_new_tokens={args.max_new_tokens}, {len(eos_ids)} EOS ids")
    sides = {
        "plain generate": lambda seed: plain_generate(model, prompts, args.n, args.max_new_tokens, eos_ids),
        "spinlm generate": lambda seed: spinlm_generate(model, prompts, args.n, args.max_new_tokens, eos_ids, seed),
    }
    rates: dict[str, list[float]] = {k: [] for k in sides}
    cpu_rates: dict[str, list[float]] = {k: [] for k in sides}
    lengths: dict[str, list[int]] = {k: [] for k in sides}
    names = list(sides)
    for run in range(args.runs + 1):   # run 0 warms up both sides and is not counted
        for name in names if run % 2 == 0 else names[::-1]:
            torch.manual_seed(run)
            seconds, cpu, rows = timed(lambda: sides[name](run))
            tokens = sum(len(r) for r in rows)
            if run > 0:
                rates[name].append(tokens / seconds)
                cpu_rates[name].append(tokens / cpu)
                lengths[name].extend(len(r) for r in rows)
            print(f"  run {run}{' (warm-up)' if run == 0 else ''} {name:16s} {seconds:6.2f} s wall {cpu:6.2f} s CPU "
                  f"{tokens:6d} tokens {tokens / seconds:7.0f} tok/s  load {os.getloadavg()[0]:.1f}")
    for name in names:
        ls = lengths[name]
        print(f"  {name:16s} median {statistics.median(rates[name]):7.0f} new tok/s wall-clock "
              f"(runs: {', '.join(f'{r:.0f}' for r in rates[name])}), {statistics.median(cpu_rates[name]):7.0f} per "
              f"CPU-second; mean response length {statistics.mean(ls):.1f}, "
              f"{sum(x == args.max_new_tokens for x in ls) / len(ls):.0%} hit max_new_tokens")
    for label, r in (("wall-clock", rates), ("CPU time", cpu_rates)):
        ratio = statistics.median(r["spinlm generate"]) / statistics.median(r["plain generate"])
        paired = statistics.median(s / p for s, p in zip(r["spinlm generate"], r["plain generate"]))
        print(f"  ratio spinlm / plain, {label}: {ratio:.2f}x (ratio of medians), "
              f"{paired:.2f}x (median of paired runs)")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["tiny", "large"])
    p.add_argument("--runs", type=int, default=5, help="measured runs per side, after one warm-up")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stop-prob", type=float, default=1 / 24, help="fraction of the vocabulary that is EOS")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.runs < 1:
        p.error(f"--runs {args.runs}: expected >= 1")
    if not 0 <= args.stop_prob < 1:
        p.error(f"--stop-prob {args.stop_prob}: expected 0 <= p < 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), "
          f"transformers {transformers.__version__}, python "
          f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    for shape in args.models:
        bench(shape, args)


if __name__ == "__main__":
    main()
