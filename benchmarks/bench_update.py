"""spinlm's preference update vs TRL's DPOTrainer, side by side on the same machine.

Both sides train the same randomly initialised Llama (built from a config, no hub) on the same pairs, with the same
batch size, number of optimizer steps, fp32, no gradient checkpointing, sigmoid loss, beta 0.1, AdamW lr 1e-5.
spinlm precomputes the reference log-probs once (as spin mode does) and times `preference_step`; TRL's DPOTrainer
runs with its default reference copy and, as a second variant, with `precompute_ref_log_probs=True`. Every variant
runs in its own subprocess so peak RSS (ru_maxrss) is per variant.

A fourth variant, spinlm_block_mask, is spinlm with one block-causal-masked sdpa call per packed row instead of
one causal call per sequence (its attention before `spinlm_packed_sdpa`). FLOPs counted: 6 N per trained token
(8 N when a reference forward runs in the step: TRL's default) plus causal attention (6 L^2 d per sequence and layer).

Texts for TRL are the token ids written as words ("t17 t5 ... </s>") under a word-level tokenizer, so TRL's own
tokenisation gives back exactly the token ids spinlm trains on.

    .venv/bin/python benchmarks/bench_update.py [--quick] [--models tiny,25m,152k] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
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

EOS, PAD = 2, 0

# name -> model shape, pair lengths, batch, steps (the first step is a warm-up and is not measured)
MODELS = {
    "tiny": dict(vocab=512, hidden=128, layers=4, heads=4, inter=384, tie=False,
                 prompt=(16, 64), response=(8, 64), batch=8, steps=7),
    "25m": dict(vocab=32000, hidden=384, layers=6, heads=6, inter=1024, tie=True,
                prompt=(64, 256), response=(32, 512), batch=4, steps=6),
    # the 25m model on long sequences (prompts 256-512, responses 1024-2048): where attention's cost shows
    "25m_long": dict(vocab=32000, hidden=384, layers=6, heads=6, inter=1024, tie=True,
                     prompt=(256, 512), response=(1024, 2048), batch=2, steps=5),
    # a real pretrained model on real text: SmolLM2-135M-Instruct (benchmarks/smollm2_study.py converts it into
    # .cache/smollm2) on the bundled task's questions and answers, its own tokenizer; rejected = another row's answer
    "smollm2": dict(path=".cache/smollm2", vocab=49152, hidden=576, layers=30, batch=8, steps=6),
    "152k": dict(vocab=152064, hidden=256, layers=2, heads=4, inter=768, tie=True,
                 prompt=(512, 512), response=(512, 512), batch=2, steps=6),
}
# spinlm_block_mask: spinlm with the block-causal mask over each packed row (its attention before PACKED_SDPA)
# spinlm_bf16 / trl_defaults: best against best (spinlm's model.dtype=bfloat16 autocast; TRL's DPOConfig defaults on
# CPU: bf16 autocast and gradient checkpointing); the others are fp32 without checkpointing, like for like
# spinlm_glibc_default: spinlm without the trainer's glibc setting for updates (spinlm/allocator.py), to show its cost
VARIANTS = ["spinlm", "spinlm_block_mask", "trl", "trl_precompute", "spinlm_bf16", "trl_defaults",
            "spinlm_glibc_default"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(spec: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if "path" in spec:
        path = os.path.join(REPO, spec["path"])
        if not os.path.isdir(path):
            sys.exit(f"bench_update.py: {path} is missing: run benchmarks/smollm2_study.py --markdown-only once "
                     "(it fetches and converts SmolLM2-135M-Instruct)")
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                      num_attention_heads=spec["heads"], num_key_value_heads=spec.get("kv_heads", spec["heads"]),
                      intermediate_size=spec["inter"], tie_word_embeddings=spec["tie"],
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).float()


def make_pairs(spec: dict) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """batch * steps pairs of random token ids (real text for a model with a path); chosen and rejected end with
    EOS."""
    n = spec["batch"] * spec["steps"]
    if "path" in spec:
        return text_pairs(spec, n)
    g = torch.Generator().manual_seed(1)

    def seq(lo_hi: tuple[int, int], eos: bool) -> list[int]:
        lo, hi = lo_hi
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(3, spec["vocab"], (k - 1 if eos else k,), generator=g).tolist()
        return ids + [EOS] if eos else ids

    prompts = [seq(spec["prompt"], False) for _ in range(n)]
    chosen = [seq(spec["response"], True) for _ in range(n)]
    rejected = [seq(spec["response"], True) for _ in range(n)]
    return prompts, chosen, rejected


def text_pairs(spec: dict, n: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """The bundled task's first n questions (prompt) and answers (chosen; rejected: the next row's answer) under the
    model's own tokenizer, without special tokens, so that TRL's word-level copy of the ids stays exact."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from spinlm.tasks.build import build_tiny_task

    tok = AutoTokenizer.from_pretrained(os.path.join(REPO, spec["path"]))
    if tok.eos_token_id != EOS:
        sys.exit(f"bench_update.py: {spec['path']}: EOS id {tok.eos_token_id}, the benchmark's word tokenizer "
                 f"uses {EOS}")
    rows = pq.read_table(build_tiny_task(os.path.join(REPO, ".cache", "tiny_task")) / "train.parquet").slice(0, n + 1)
    rows = rows.to_pylist()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [ids(r["prompt"][0]["content"] + "\n") for r in rows[:n]]
    answers = [ids(r["extra_info"]["answer"]) + [EOS] for r in rows]
    return prompts, answers[:n], answers[1:]


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: everything except the input embedding lookup, lm-head counted once."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return total - emb + (emb if tied else 0)


@functools.cache  # summarise asks once per variant and round; the pairs (a tokenizer for real text) stay the same
def attention_flops(spec_json: str, factor: int) -> list[float]:
    """Per step, the causal attention FLOPs: per sequence and layer 2 L^2 d forward (QK^T and AV over the L^2 / 2
    causal pairs), backward twice that (factor 6; 8 when a reference forward runs in the step). The spec comes as
    its JSON text, the cache's key."""
    spec = json.loads(spec_json)
    prompts, chosen, rejected = make_pairs(spec)
    b = spec["batch"]
    return [factor / 3 * 2 * spec["hidden"] * spec["layers"] * sum(
        (len(prompts[i]) + len(resp[i])) ** 2 for i in range(s * b, (s + 1) * b) for resp in (chosen, rejected))
        for s in range(spec["steps"])]


def compute_dtype(bf16: bool) -> torch.dtype:
    """The dtype a variant's matmuls run in (bf16 autocast for spinlm_bf16 and TRL's defaults): the limit's dtype."""
    return torch.bfloat16 if bf16 else torch.float32


def trainer_optimizer(model) -> torch.optim.Optimizer:
    """The optimizer the trainer builds (AdamW, fused on CPU; weight decay 0 as TRL's default), at lr 1e-5."""
    from spinlm.config import load_config
    from spinlm.workers.fsdp_workers import build_optimizer

    return build_optimizer(model.parameters(), load_config(["actor.lr=1e-5"]).actor)


def run_spinlm(spec: dict, block_mask: bool = False, bf16: bool = False, allocator: bool = True) -> dict:
    """spinlm's step as PolicyWorker.update runs it on CPU: preference_step inside large_blocks_returned() (glibc
    returns freed activations to the OS during the update; `allocator=False` leaves glibc's defaults)."""
    from spinlm.allocator import large_blocks_returned
    from spinlm.modeling import forward_context
    from spinlm.pairs import Pairs
    from spinlm.workers.dp_actor import DataParallelActor, LossSettings
    from spinlm.workers.logprobs import ResponseLogProbs

    model = build_model(spec)
    prompts, chosen, rejected = make_pairs(spec)
    wrapper = ResponseLogProbs(model)
    if block_mask:
        model.set_attn_implementation("sdpa")
    forward = (lambda: forward_context("bfloat16", torch.device("cpu"))) if bf16 else contextlib.nullcontext
    actor = DataParallelActor(wrapper, micro_batch_size=spec["batch"], max_tokens_per_micro_batch=None,
                              forward_context=forward)
    t0 = time.perf_counter()
    ref_c = actor.sequence_logps(prompts, chosen)
    ref_r = actor.sequence_logps(prompts, rejected)
    ref_s = time.perf_counter() - t0
    opt = trainer_optimizer(model)
    b = spec["batch"]
    times, tokens, losses, probes = [], [], [], []
    for s in range(spec["steps"]):
        idx = list(range(s * b, (s + 1) * b))
        pairs = Pairs([prompts[i] for i in idx], [chosen[i] for i in idx], [rejected[i] for i in idx])
        t = time.perf_counter()
        with large_blocks_returned() if allocator else contextlib.nullcontext():
            m = actor.preference_step(pairs, ref_c[idx], ref_r[idx], LossSettings(beta=0.1), opt, grad_clip=1.0)
        times.append(time.perf_counter() - t)
        tokens.append(m["train/tokens"])
        losses.append(m["loss"])
        probes.append(matmul_flops(reps=2, dtype=compute_dtype(bf16)))
    return dict(times=times, tokens=tokens, first_loss=losses[0], ref_precompute_s=ref_s, probes=probes,
                ref_in_step=False, matmul_params=matmul_params(model))


def word_tokenizer(vocab: int):
    """Word-level tokenizer whose words "t<i>" are token id i, so decoded ids tokenise back to the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<s>": 1, "</s>": EOS, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def to_text(ids: list[int]) -> str:
    return " ".join("</s>" if i == EOS else f"t{i}" for i in ids)


def run_trl(spec: dict, precompute: bool, defaults: bool = False) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from transformers import LlamaForCausalLM

    tok = word_tokenizer(spec["vocab"])
    prompts, chosen, rejected = make_pairs(spec)
    # the prompt text ends with a space so prompt + completion splits into the same words
    data = {"prompt": [to_text(p) + " " for p in prompts], "chosen": [to_text(c) for c in chosen],
            "rejected": [to_text(r) for r in rejected]}
    ids_c = tok([p + c for p, c in zip(data["prompt"], data["chosen"])], add_special_tokens=False)["input_ids"]
    ids_r = tok([p + r for p, r in zip(data["prompt"], data["rejected"])], add_special_tokens=False)["input_ids"]
    exact = all(a == p + c for a, p, c in zip(ids_c, prompts, chosen)) and \
        all(a == p + r for a, p, r in zip(ids_r, prompts, rejected))
    tokens_per_step_mean = sum(len(a) + len(b) for a, b in zip(ids_c, ids_r)) / spec["steps"]

    times: list[float] = []
    probes: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            probes.append(matmul_flops(reps=2, dtype=compute_dtype(defaults)))  # outside the timed step

    with tempfile.TemporaryDirectory() as out:
        # TRL's default reference model is a second copy loaded from the policy's path, so give it one
        build_model(spec).save_pretrained(f"{out}/model")
        model = LlamaForCausalLM.from_pretrained(f"{out}/model", dtype=torch.float32)
        args = DPOConfig(output_dir=f"{out}/run", use_cpu=True, report_to=[], per_device_train_batch_size=spec["batch"],
                         gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=1e-5, beta=0.1,
                         loss_type="sigmoid", logging_steps=1, save_strategy="no",
                         **({} if defaults else dict(gradient_checkpointing=False, bf16=False, fp16=False)),
                         max_length=None, precompute_ref_log_probs=precompute,
                         max_grad_norm=1.0, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                         lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data), processing_class=tok,
                             callbacks=[StepTimer()])
        t0 = time.perf_counter()
        trainer.train()
        total_s = time.perf_counter() - t0
        logs = [h for h in trainer.state.log_history if "loss" in h]
    return dict(times=times, tokens=[tokens_per_step_mean] * len(times), first_loss=logs[0]["loss"] if logs else None,
                probes=probes,
                train_total_s=total_s, ref_in_step=not precompute, token_ids_exact=exact,
                matmul_params=matmul_params(model))


def child(spec: dict, model_name: str, variant: str) -> None:
    out = (run_spinlm(spec, block_mask=variant == "spinlm_block_mask", bf16=variant == "spinlm_bf16",
                      allocator=variant != "spinlm_glibc_default")
           if variant.startswith("spinlm")
           else run_trl(spec, precompute=variant == "trl_precompute", defaults=variant == "trl_defaults"))
    out.update(model=model_name, spec=spec, variant=variant, load_avg=os.getloadavg()[0],
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(out))


def profile_spinlm(model_name: str) -> None:
    """Where spinlm's step time goes: torch.profiler over two preference steps (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    from spinlm.pairs import Pairs
    from spinlm.workers.dp_actor import DataParallelActor, LossSettings
    from spinlm.workers.logprobs import ResponseLogProbs

    spec = MODELS[model_name]
    model = build_model(spec)
    prompts, chosen, rejected = make_pairs(spec)
    actor = DataParallelActor(ResponseLogProbs(model), micro_batch_size=spec["batch"], max_tokens_per_micro_batch=None)
    ref_c, ref_r = actor.sequence_logps(prompts, chosen), actor.sequence_logps(prompts, rejected)
    opt = trainer_optimizer(model)
    b = spec["batch"]

    def step(s: int) -> None:
        idx = list(range(s * b, (s + 1) * b))
        pairs = Pairs([prompts[i] for i in idx], [chosen[i] for i in idx], [rejected[i] for i in idx])
        actor.preference_step(pairs, ref_c[idx], ref_r[idx], LossSettings(beta=0.1), opt, grad_clip=1.0)

    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(1)
        step(2)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def matmul_flops(n: int = 2048, reps: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """matmul FLOP/s of this machine in `dtype` (best of `reps` n x n x n products)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


class ChildFailed(RuntimeError):
    def __init__(self, label: str, returncode: int, stderr: str):
        super().__init__(f"{label} failed (exit {returncode}):\n{stderr[-3000:]}")
        self.returncode, self.stderr = returncode, stderr


def run_child(child_args: list[str], label: str, preexec_fn=None) -> dict:
    """One variant in its own subprocess (`--child MODEL VARIANT` or `--child-spec JSON VARIANT`): its RESULT dict;
    ChildFailed when it exits non-zero."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *child_args], capture_output=True, text=True,
                          preexec_fn=preexec_fn)
    if proc.returncode != 0:
        raise ChildFailed(label, proc.returncode, proc.stderr)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def machine() -> dict:
    """cpu, its bf16 / AMX units, cores, library versions, fp32 and bf16 matmul rates, load average; `line` is all of
    it as one line. Hosts of the same name differ: whether bf16 matmuls are fast depends on avx512_bf16 / AMX."""
    import transformers
    import trl

    peak, peak_bf16 = matmul_flops(), matmul_flops(dtype=torch.bfloat16)
    info = open("/proc/cpuinfo").read().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), [])
    units = [f for f in flags if f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")]
    line = (f"cpu: {cpu} ({' '.join(units) or 'no avx512'}), {os.cpu_count()} cores, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, trl {trl.__version__}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, matmul 2048^2 fp32 {peak / 1e9:.1f} / bf16 "
            f"{peak_bf16 / 1e9:.1f} GFLOP/s, load avg {os.getloadavg()[0]:.2f}")
    return dict(cpu=cpu, units=units, cores=os.cpu_count(), torch=torch.__version__,
                transformers=transformers.__version__, trl=trl.__version__, matmul_flops=peak,
                matmul_flops_bf16=peak_bf16, load_avg=os.getloadavg()[0], line=line)


def summarise(r: dict) -> dict:
    measured = r["times"][1:]  # the first step is a warm-up
    step_s = statistics.median(measured)
    tok = statistics.mean(r["tokens"])
    factor = 8 if r["ref_in_step"] else 6
    attention = statistics.mean(attention_flops(json.dumps(r["spec"], sort_keys=True), factor))  # all steps, as `tok`
    flops_per_s = (factor * r["matmul_params"] * tok + attention) / step_s
    # the limit: the best matmul rate probed between this child's steps, in its compute dtype (the machine's speed
    # drifts by up to 25% from minute to minute on this shared host; a probe at another time would misjudge it)
    limit = max(r["probes"])
    return dict(model=r["model"], variant=r["variant"], measured_steps=len(measured), median_step_s=step_s,
                tokens_per_step=tok, tokens_per_s=tok / step_s, peak_rss_mb=r["peak_rss_mb"],
                flops_per_s=flops_per_s, matmul_limit=limit, flops_frac=flops_per_s / limit,
                attention_flop_share=attention / (factor * r["matmul_params"] * tok + attention),
                load_avg=r["load_avg"],
                first_loss=r["first_loss"], token_ids_exact=r.get("token_ids_exact"))


BF16 = ("spinlm_bf16", "trl_defaults")  # the variants whose matmuls run in bf16


def ratios(a: list[dict], b: list[dict]) -> str:
    """tokens/s and peak RSS of a over b: the ratio of medians, and the median of the ratios of runs alternated in
    the same round (the steadier of the two when the machine's speed drifts)."""
    med = lambda runs, k: statistics.median(x[k] for x in runs)  # noqa: E731
    paired = statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(a, b))
    return (f"speed {med(a, 'tokens_per_s') / med(b, 'tokens_per_s'):.2f}x (paired runs: {paired:.2f}x), "
            f"peak RSS {med(a, 'peak_rss_mb') / med(b, 'peak_rss_mb'):.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the tiny model")
    p.add_argument("--models", default="tiny,25m,152k", help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS[:4]), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=5, help="runs of every variant, alternated; medians reported")
    p.add_argument("--profile", metavar="MODEL", help="print a torch.profiler summary of spinlm's step and exit")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    # a spec dict with a MODELS entry's keys, as JSON (benchmarks/sweep_update.py)
    p.add_argument("--child-spec", nargs=2, metavar=("JSON", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        print("bench_update.py needs TRL for the comparison: pip install -e \".[bench]\" (trl==1.16.0)", file=sys.stderr)
        sys.exit(1)
    if args.child:
        child(MODELS[args.child[0]], *args.child)
        return
    if args.child_spec:
        child(json.loads(args.child_spec[0]), "spec", args.child_spec[1])
        return
    if args.profile:
        profile_spinlm(args.profile)
        return
    models = ["tiny"] if args.quick else args.models.split(",")
    variants = args.variants.split(",")
    for name in models + variants:
        if name not in MODELS and name not in VARIANTS:
            p.error(f"unknown model/variant {name!r}; models: {', '.join(MODELS)}; variants: {', '.join(VARIANTS)}")
    host = machine()
    print(host["line"])
    rows = []
    for m in models:
        # variants alternate round by round so a burst of load from another process, or a slower minute of the
        # host, hits them alike; each variant is its median over the rounds
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                runs[v].append(summarise(run_child(["--child", m, v], f"{m}/{v}")))
        by_variant = {}
        for v in variants:
            # the median run (by step time) stands for the variant; every run's numbers are kept in the JSON
            med = statistics.median_low([x["median_step_s"] for x in runs[v]])
            r = dict(next(x for x in runs[v] if x["median_step_s"] == med))
            r.update(runs=runs[v], tokens_per_s=statistics.median([x["tokens_per_s"] for x in runs[v]]),
                     flops_frac=statistics.median([x["flops_frac"] for x in runs[v]]),
                     peak_rss_mb=statistics.median([x["peak_rss_mb"] for x in runs[v]]),
                     load_avg=max(x["load_avg"] for x in runs[v]))
            by_variant[v] = r
            rows.append(r)
            each = lambda key, scale=1: ", ".join(f"{scale * x[key]:.0f}" for x in runs[v])  # noqa: E731
            print(f"{m:5s} {v:15s} {r['tokens_per_s']:.0f} tok/s (runs {each('tokens_per_s')})  "
                  f"tokens/step {r['tokens_per_step']:.0f}  peak RSS {r['peak_rss_mb']:.0f} MB  "
                  f"{100 * r['flops_frac']:.1f}% of the {'bf16' if v in BF16 else 'fp32'} matmul limit "
                  f"(runs {each('flops_frac', 100)})  "
                  f"load {r['load_avg']:.2f}  loss0 {r['first_loss']:.4f}  ids exact {r['token_ids_exact']}", flush=True)
        if "spinlm_bf16" in by_variant and "trl_defaults" in by_variant:  # best against best
            s, t = by_variant["spinlm_bf16"], by_variant["trl_defaults"]
            print(f"{m:5s} spinlm_bf16 vs trl_defaults: {ratios(runs['spinlm_bf16'], runs['trl_defaults'])}",
                  flush=True)
        if "spinlm" in by_variant:
            s = by_variant["spinlm"]
            for v in [x for x in variants if x not in ("spinlm", "spinlm_bf16", "trl_defaults")]:
                print(f"{m:5s} spinlm vs {v}: {ratios(runs['spinlm'], runs[v])}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=host, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
