"""Rollout throughput: spinlm's `hf` engine and its `vllm` engine (vLLM's CPU backend) against plain
`model.generate(num_return_sequences=n, do_sample=True)`, side by side in one run.

Every side loads the same weights from the same folder and gets the same prompts (one batch: all prompts at once),
the same sampling (temperature 1, top-k and top-p off), the same EOS set, and returns n samples per prompt.
Throughput is new tokens per second, counting only real tokens (each sample cut after its first EOS). Each side runs
in its own process (vLLM pins threads and spawns helpers; the vllm side runs under the interpreter of the opt-in
environment that scripts/setup_vllm_env.sh builds): one warm-up run, then --runs measured runs. Each side's process
runs --rounds times, the sides' order alternating round by round; medians over all measured runs are reported.
Start-up (model load; for vLLM also its engine and KV-cache set-up) is timed apart and not in tokens/s.

Models: `tiny` (the bundled task's shape, 0.9M parameters) and `37m` (32k vocabulary, 8 layers of width 512) with
random weights: to make response lengths vary as they do in self-play, EOS is a set of token ids, a fraction
--stop-prob of the vocabulary, so a sample ends with about that probability per step (a random model's next-token
distribution is close to uniform). `smollm2`: SmolLM2-135M-Instruct (converted into .cache/smollm2 by
benchmarks/smollm2_study.py) on the bundled task's questions under its chat template, its own EOS.

    .venv/bin/python benchmarks/bench_rollout.py [--models tiny 37m smollm2] [--sides plain hf vllm] [--runs 3]
        [--rounds 2] [--prompts 64] [--n 4] [--max-new-tokens 64] [--vllm-python /work/vllm-venv/bin/python]
        [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from spinlm.process_defaults import apply_process_defaults

# as the spinlm command runs (OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads on shared cores make step times swing
# by 10x and more), for every side; before torch is imported
apply_process_defaults()

import torch  # noqa: E402  (after apply_process_defaults)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = 0
SHAPES = {
    # The bundled tiny task's model (spinlm/tasks/tiny_model.py): ~1M parameters, tied embeddings.
    "tiny": dict(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=384, tie_word_embeddings=True),
    # A small real-vocabulary model: tied 32k embeddings, 8 layers of width 512 (37M parameters).
    "37m": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, intermediate_size=1024, tie_word_embeddings=True),
}
SMOLLM2 = os.path.join(REPO, ".cache", "smollm2")
SIDES = {"plain": "plain generate", "hf": "spinlm hf engine", "vllm": "spinlm vllm engine"}


def save_random_model(shape: str, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, pad_token_id=PAD, bos_token_id=None,
                                         eos_token_id=None, **SHAPES[shape]))
    model.generation_config.eos_token_id = None   # the EOS set is passed explicitly to every side
    model.save_pretrained(out)


def workload(model: str, args) -> dict:
    """The prompts and EOS set every side gets, as plain lists (they travel to the children as JSON)."""
    if model == "smollm2":
        import pyarrow.parquet as pq
        from transformers import AutoTokenizer

        from spinlm.data.tokenize import encode_prompt
        from spinlm.tasks.build import build_tiny_task

        tok = AutoTokenizer.from_pretrained(SMOLLM2)
        rows = pq.read_table(build_tiny_task(os.path.join(REPO, ".cache", "tiny_task")) / "val.parquet")
        prompts = [encode_prompt(tok, r) for r in rows.column("prompt").to_pylist()[: args.prompts]]
        return dict(prompts=prompts, eos=[tok.eos_token_id], pad=tok.pad_token_id)
    vocab = SHAPES[model]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 65, (args.prompts,), generator=g).tolist()
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    return dict(prompts=prompts, eos=list(range(1, 1 + round(vocab * args.stop_prob))), pad=PAD)


# ---- one side, in its own process ------------------------------------------------------------------------------

def side_generator(side: str, path: str, work: dict, n: int, max_new_tokens: int):
    """(start-up seconds, a function seed -> flat list of responses) for one side."""
    from transformers import AutoModelForCausalLM

    from spinlm.data.tokenize import cut_at_eos
    from spinlm.rollout.hf_rollout import SamplingParams, generate

    prompts, eos, pad = work["prompts"], set(work["eos"]), work["pad"]
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    if side == "vllm":
        from spinlm.rollout.vllm_rollout import VllmRollout

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's CPU default (4) is a sixth of this machine
        engine = VllmRollout(path, dtype="float32", max_model_len=max(map(len, prompts)) + max_new_tokens,
                             gpu_memory_utilization=0.3, enforce_eager=True, sleep=False, seed=0, distributed=False,
                             device=torch.device("cpu"))
        return time.perf_counter() - t0, lambda seed: engine.generate(prompts, params, eos_ids=eos, seed=seed).flat()[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    startup = time.perf_counter() - t0
    if side == "hf":
        return startup, lambda seed: generate(model, prompts, params, pad_id=pad, eos_ids=eos,
                                              batch_size=len(prompts), seed=seed, progress=False).flat()[0]

    def plain(seed: int) -> list[list[int]]:
        """The baseline: one left-padded, length-sorted batch through `generate`."""
        torch.manual_seed(seed)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(order):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 num_return_sequences=n, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 pad_token_id=pad, eos_token_id=sorted(eos), use_cache=True)
        return [cut_at_eos(row, eos)[0] for row in out[:, width:].tolist()]
    return startup, plain


def child(side: str, path: str, work_file: str, n: int, max_new_tokens: int, runs: int) -> None:
    with open(work_file) as f:
        work = json.load(f)
    startup, gen = side_generator(side, path, work, n, max_new_tokens)
    rows = []
    for run in range(runs + 1):   # run 0 warms up and is not counted
        wall, cpu = time.perf_counter(), time.process_time()
        out = gen(run)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append(dict(wall=wall, cpu=cpu, tokens=sum(map(len, out)), lengths=[len(r) for r in out],
                         load=os.getloadavg()[0]))
    import transformers

    print("RESULT " + json.dumps(dict(side=side, startup_s=startup, runs=rows[1:], warmup=rows[0],
                                      threads=torch.get_num_threads(), torch=torch.__version__,
                                      transformers=transformers.__version__, python=sys.executable)))


# ---- the comparison ----------------------------------------------------------------------------------------------

def run_side(python: str, side: str, path: str, work_file: str, args) -> dict:
    cmd = [python, os.path.abspath(__file__), "--child", side, path, work_file, "--n", str(args.n),
           "--max-new-tokens", str(args.max_new_tokens), "--runs", str(args.runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if proc.returncode != 0:
        raise RuntimeError(f"{side} side failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])


def bench(model: str, args) -> list[dict]:
    work = workload(model, args)
    with tempfile.TemporaryDirectory() as tmp:
        path = SMOLLM2 if model == "smollm2" else os.path.join(tmp, "model")
        if model != "smollm2":
            save_random_model(model, path)
        elif not os.path.isdir(path):
            sys.exit(f"bench_rollout.py: {path} is missing: run benchmarks/smollm2_study.py --markdown-only once "
                     "(it fetches and converts SmolLM2-135M-Instruct)")
        work_file = os.path.join(tmp, "work.json")
        with open(work_file, "w") as f:
            json.dump(work, f)
        prompt_lens = [len(p) for p in work["prompts"]]
        print(f"\n## {model}: {len(work['prompts'])} prompts of {min(prompt_lens)}-{max(prompt_lens)} tokens, "
              f"n={args.n}, max_new_tokens={args.max_new_tokens}, {len(work['eos'])} EOS ids", flush=True)
        # --rounds rounds, each side's process once per round, the order alternating: a slower minute of the shared
        # host falls on every side alike
        raw: dict[str, list[dict]] = {side: [] for side in args.sides}
        for rnd in range(args.rounds):
            for side in args.sides if rnd % 2 == 0 else args.sides[::-1]:
                raw[side].append(run_side(args.vllm_python if side == "vllm" else sys.executable, side, path,
                                          work_file, args))
        results = []
        for side in args.sides:
            runs = [x for r in raw[side] for x in r["runs"]]
            first = raw[side][0]
            rates = [x["tokens"] / x["wall"] for x in runs]
            cpu_rates = [x["tokens"] / x["cpu"] for x in runs]
            lengths = [n for x in runs for n in x["lengths"]]
            row = dict(model=model, side=side, startup_s=statistics.median(r["startup_s"] for r in raw[side]),
                       tokens_per_s=statistics.median(rates), runs_tokens_per_s=rates,
                       tokens_per_cpu_s=statistics.median(cpu_rates), mean_length=statistics.mean(lengths),
                       hit_max=sum(n == args.max_new_tokens for n in lengths) / len(lengths),
                       load=max(x["load"] for x in runs), threads=first["threads"], torch=first["torch"],
                       transformers=first["transformers"])
            results.append(row)
            print(f"  {SIDES[side]:19s} median {row['tokens_per_s']:7.0f} new tok/s (runs: "
                  f"{', '.join(f'{x:.0f}' for x in rates)}), {row['tokens_per_cpu_s']:6.0f} per CPU-second; start-up "
                  f"{row['startup_s']:5.1f} s; mean length {row['mean_length']:.1f}, {row['hit_max']:.0%} hit the "
                  f"limit; {first['threads']} threads, torch {first['torch']}, transformers {first['transformers']}; "
                  f"load {row['load']:.1f}", flush=True)
    by_side = {r["side"]: r for r in results}
    for a, b in (("hf", "plain"), ("hf", "vllm"), ("vllm", "plain")):
        if a in by_side and b in by_side:
            print(f"  {SIDES[a]} / {SIDES[b]}: {by_side[a]['tokens_per_s'] / by_side[b]['tokens_per_s']:.2f}x "
                  f"tokens/s (ratio of medians)")
    return results


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=[*SHAPES, "smollm2"], default=["tiny", "37m", "smollm2"])
    p.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES))
    p.add_argument("--runs", type=int, default=3, help="measured runs per side process, after one warm-up")
    p.add_argument("--rounds", type=int, default=2, help="processes per side, alternated; medians over all runs")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stop-prob", type=float, default=1 / 24, help="random models: fraction of the vocabulary that "
                                                                   "is EOS")
    p.add_argument("--vllm-python", default=os.path.join(os.environ.get("SPINLM_VLLM_VENV", "/work/vllm-venv"),
                                                         "bin", "python"),
                   help="the interpreter of the vLLM environment (scripts/setup_vllm_env.sh)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs=3, metavar=("SIDE", "MODEL_DIR", "WORK_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, n=args.n, max_new_tokens=args.max_new_tokens, runs=args.runs)
        return
    if args.runs < 1 or args.rounds < 1:
        p.error(f"--runs {args.runs} --rounds {args.rounds}: expected >= 1 each")
    if not 0 <= args.stop_prob < 1:
        p.error(f"--stop-prob {args.stop_prob}: expected 0 <= p < 1")
    if "vllm" in args.sides and not os.path.exists(args.vllm_python):
        p.error(f"--vllm-python {args.vllm_python} does not exist: build it with scripts/setup_vllm_env.sh, or "
                "leave out --sides vllm")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, fp32, load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = [r for model in args.models for r in bench(model, args)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=cpu_model(), cores=os.cpu_count(), args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
