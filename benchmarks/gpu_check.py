"""The device check: a Qwen2.5-0.5B-shaped model (random weights, built from its config, no hub) through a few SPIN
steps with the hf engine on one GPU, in one process, with the trainer's own PolicyWorker. Prints rollout and update
tokens/s, the update's MFU and peak GPU memory (at TRL's micro-batch and at the whole batch), bf16 against fp32
log-probs, online_dpo's peak memory with and without `actor.opponent_offload`, the same update through TRL's
DPOTrainer (when trl and datasets import), then the FSDP2 path (a one-rank NCCL group, gloo on CPU: fully_shard with
bf16 mixed precision, CPUOffloadPolicy for the opponent) against the single-process numbers, and one JSON line with
every number.

Needs only torch, transformers, tokenizers and omegaconf (no ray, hydra or vLLM). `--tiny` shrinks everything so the
whole path runs on a CPU in well under a minute (that is how it is tested); benchmarks/gpu_check.sh is the launcher.

    python benchmarks/gpu_check.py [--tiny] [--gradient-checkpointing] [--no-trl] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's spinlm, installed or not

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

EOS, PAD = 2, 0

# Qwen2.5-0.5B's config.json (494M parameters, tied embeddings); `tiny` keeps its shape ratios at a CPU size.
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(QWEN25_05B, vocab_size=1024, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
# prompts per rollout, prompt and response tokens, pairs per optimizer step, micro-batch, measured steps
FULL_RUN = dict(prompts=64, prompt_len=128, response_len=256, batch=32, micro_batch=8, steps=6)
TINY_RUN = dict(prompts=8, prompt_len=16, response_len=16, batch=8, micro_batch=4, steps=2)
# dense bf16 tensor-core peak per GPU, FLOP/s
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def build_model_dir(out: Path, shape: dict) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(out)


def build_tokenizer_dir(out: Path) -> None:
    """A word-level tokenizer that only supplies the special ids the worker reads (pad, eos); token ids are fed
    directly. Its own folder: with model_type qwen2 next to it, AutoTokenizer would swap in Qwen2Tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<pad>": PAD, "<s>": 1, "</s>": EOS}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            padding_side="left").save_pretrained(out)


def random_ids(gen: torch.Generator, n: int, length: int, vocab: int) -> list[list[int]]:
    return torch.randint(3, vocab, (n, length), generator=gen).tolist()


def flops_per_update(model, tokens: int, response_tokens: int) -> float:
    """Model FLOPs of one forward + backward: 6 x body parameters per token, and 6 x the lm-head per predicted token
    (only response positions need it). Attention scores are left out; the same count is used for TRL."""
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - emb.numel() - (0 if head is emb else head.numel())
    return 6.0 * body * tokens + 6.0 * head.numel() * response_tokens


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rollout(worker, prompts: list[list[int]], new_tokens: int, device: torch.device):
    """A short warm-up call (kernels, allocator), then the timed rollout: (its Rollout, seconds)."""
    from spinlm.rollout.hf_rollout import SamplingParams

    worker.generate(prompts[:4], SamplingParams(max_new_tokens=4), seed=0, desc="warm-up")
    synchronize(device)
    t = time.perf_counter()
    rollout = worker.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=1.0), seed=1)
    synchronize(device)
    return rollout, time.perf_counter() - t


def peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory since the last reset, GiB (None on a CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_updates(worker, pairs, ref_c, ref_r, run: dict, device: torch.device, first: int) -> dict:
    """run["steps"] + 1 optimizer steps of run["batch"] pairs (the first one a warm-up, not timed), starting at pair
    first * batch; tokens/s, model FLOP/s and peak memory of the timed ones, every step's loss."""
    from spinlm.workers.dp_actor import LossSettings

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, tokens, losses, flops = [], [], [], []
    b = run["batch"]
    for s in range(first, first + run["steps"] + 1):
        idx = [(s * b + i) % len(pairs) for i in range(b)]
        synchronize(device)
        t = time.perf_counter()
        m = worker.update(pairs.select(idx), LossSettings(beta=0.1), b, ref=(ref_c[idx], ref_r[idx]))
        synchronize(device)
        if s > first:
            times.append(time.perf_counter() - t)
            tokens.append(m["train/tokens"])
            response_tokens = sum(len(pairs.chosen[i]) + len(pairs.rejected[i]) for i in idx)
            flops.append(flops_per_update(worker.model, int(m["train/tokens"]), response_tokens))
        losses.append(m["loss"])
    return dict(update_tokens_per_s=sum(tokens) / sum(times), update_step_s=sum(times) / len(times),
                update_flops_per_s=sum(flops) / sum(times), flops_per_step=sum(flops) / len(flops),
                update_peak_memory_gb=peak_gib(device), losses=losses)


def profile_worker(worker, pairs, ref_c, ref_r, run: dict, device: torch.device, out: Path) -> None:
    """torch.profiler over one update step and a short rollout: the top operators by device time (CPU time on a
    CPU) and by CPU time, written to out/profile_{update,rollout}.txt and printed."""
    from torch.profiler import ProfilerActivity, profile

    from spinlm.rollout.hf_rollout import SamplingParams
    from spinlm.workers.dp_actor import LossSettings

    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    first = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    b = run["batch"]
    idx = list(range(b))
    jobs = {"update": lambda: worker.update(pairs.select(idx), LossSettings(beta=0.1), b, ref=(ref_c[idx], ref_r[idx])),
            "rollout": lambda: worker.generate(pairs.prompts[:16], SamplingParams(max_new_tokens=16, temperature=1.0),
                                               seed=2)}
    for name, job in jobs.items():
        synchronize(device)
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            job()
            synchronize(device)
        wall = time.perf_counter() - t
        table = "\n".join(f"--- sorted by {key} ---\n" + prof.key_averages().table(sort_by=key, row_limit=22,
                                                                                   max_name_column_width=60)
                          for key in dict.fromkeys([first, "cpu_time_total"]))
        (out / f"profile_{name}.txt").write_text(f"{name}: {wall:.3f}s wall under the profiler\n{table}")
        print(f"profile {name}: {wall:.3f}s wall; top by {first}:", flush=True)
        print(prof.key_averages().table(sort_by=first, row_limit=12, max_name_column_width=50), flush=True)


def worker_config(model_dir: Path, tok_dir: Path, device: torch.device, dtype: str, run: dict, *overrides: str):
    from spinlm.config import load_config

    return load_config([f"model.path={model_dir}", f"model.tokenizer_path={tok_dir}", f"model.dtype={dtype}",
                        f"trainer.device={device.type}", "actor.lr=1e-5", "actor.warmup_ratio=0",
                        "actor.lr_scheduler=constant", f"actor.micro_batch_size={run['micro_batch']}",
                        f"rollout.batch_size={run['prompts']}", *overrides])


def release(device: torch.device) -> None:
    """Free what the last worker held, so that the next peak-memory reading starts from nothing."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_spinlm(model_dir: Path, tok_dir: Path, run: dict, args, device: torch.device, dtype: str) -> dict:
    from spinlm.pairs import Pairs
    from spinlm.workers.fsdp_workers import PolicyWorker

    cfg = worker_config(model_dir, tok_dir, device, dtype, run,
                        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}")
    torch.manual_seed(0)
    t = time.perf_counter()
    worker = PolicyWorker(cfg, str(model_dir), keep_opponent=False)
    load_s = time.perf_counter() - t
    vocab = worker.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = random_ids(gen, run["prompts"], run["prompt_len"], vocab)

    rollout, rollout_s = timed_rollout(worker, prompts, run["response_len"], device)
    samples = [r[0] for r in rollout.responses]
    rollout_tokens = sum(map(len, samples))

    # SPIN: chosen = a "ground truth" response, rejected = the model's own sample; opponent log-probs as numbers
    chosen = random_ids(gen, len(prompts), run["response_len"], vocab)
    pairs = Pairs(prompts, chosen, samples)
    ref_c = worker.sequence_logps(pairs.prompts, pairs.chosen)
    ref_r = worker.sequence_logps(pairs.prompts, pairs.rejected)
    worker.start_schedule(2 * (run["steps"] + 1))
    timed = time_updates(worker, pairs, ref_c, ref_r, run, device, first=0)
    # the same steps with the whole batch in one micro-batch (what a GPU has room for), continuing the schedule
    worker.actor.micro_batch_size = run["batch"]
    whole = time_updates(worker, pairs, ref_c, ref_r, run, device, first=run["steps"] + 1)
    if args.profile:
        profile_worker(worker, pairs, ref_c, ref_r, run, device, Path(args.profile))
    master = {str(p.dtype) for p in worker.policy.parameters()}
    pairs_out = (pairs, ref_c, ref_r)
    result = dict(load_s=load_s, rollout_tokens=rollout_tokens, rollout_s=rollout_s,
                  rollout_tokens_per_s=rollout_tokens / rollout_s, **timed,
                  **{f"whole_batch_{k}": v for k, v in whole.items() if k != "losses"},
                  master_dtypes=sorted(master), attn_implementation=worker.attn_implementation)
    del worker
    return result, pairs_out


def check_opponent_offload(model_dir: Path, tok_dir: Path, device: torch.device, dtype: str, pairs, run: dict) -> dict:
    """online_dpo's resident opponent, without and with `actor.opponent_offload`: peak memory of a step that takes
    the reference log-probs from the opponent (its pass, then the update), and, offloaded, that the opponent gives
    the policy's log-probs (same weights) and is back in CPU memory after its pass."""
    from spinlm.workers.dp_actor import LossSettings
    from spinlm.workers.fsdp_workers import PolicyWorker

    out = {}
    batch = pairs.select(list(range(run["batch"])))
    for offload in (False, True):
        release(device)
        worker = PolicyWorker(worker_config(model_dir, tok_dir, device, dtype, run,
                                            f"actor.opponent_offload={str(offload).lower()}"),
                              str(model_dir), keep_opponent=True)
        policy = worker.sequence_logps(batch.prompts, batch.chosen)
        opponent = worker.sequence_logps(batch.prompts, batch.chosen, opponent=True)
        worker.start_schedule(1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        loss = worker.update(batch, LossSettings(beta=0.1), run["batch"])["loss"]
        peak = peak_gib(device)
        where = {str((p.to_local() if isinstance(p, DTensor) else p).device) for p in worker.opponent.parameters()}
        out["offload" if offload else "resident"] = dict(
            peak_memory_gb=peak, opponent_devices=sorted(where), first_loss=loss,
            opponent_max_abs_diff=float((policy - opponent).abs().max()))
        del worker
    release(device)
    return out


def check_precision(model_dir: Path, tok_dir: Path, device: torch.device, pairs, run: dict) -> dict:
    """The same sequences' log-probs in fp32 and in bf16 (autocast over fp32 weights): per-sequence and per-token
    differences, and how often the chosen-minus-rejected margin keeps its sign."""
    from spinlm.workers.fsdp_workers import PolicyWorker

    n = min(len(pairs), 32)
    sub = pairs.select(list(range(n)))
    logps = {}
    for dtype in ("float32", "bfloat16"):
        worker = PolicyWorker(worker_config(model_dir, tok_dir, device, dtype, run), str(model_dir),
                              keep_opponent=False)
        logps[dtype] = (worker.sequence_logps(sub.prompts, sub.chosen).double(),
                        worker.sequence_logps(sub.prompts, sub.rejected).double())
        del worker
        release(device)
    (c32, r32), (c16, r16) = logps["float32"], logps["bfloat16"]
    diff = torch.cat([c16 - c32, r16 - r32]).abs()
    tokens = torch.tensor([len(x) for x in sub.chosen + sub.rejected], dtype=torch.float64)
    return dict(sequences=2 * n, max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                max_rel_diff=float((diff / torch.cat([c32, r32]).abs()).max()),
                mean_abs_diff_per_token=float((diff / tokens).mean()),
                margin_sign_agreement=float(((c16 - r16).sign() == (c32 - r32).sign()).double().mean()),
                max_margin_diff=float(((c16 - r16) - (c32 - r32)).abs().max()))


def check_fsdp2(model_dir: Path, tok_dir: Path, device: torch.device, dtype: str, pairs, ref, run: dict,
                single: dict) -> dict:
    """The multi-GPU code path on one device: a one-rank process group (NCCL on CUDA, gloo on CPU) makes the worker
    shard with fully_shard (bf16 MixedPrecisionPolicy, fp32 reduce). The same steps on the same pairs as the
    single-process run (its losses to compare), a rollout from the gathered shards, and the opponent under
    CPUOffloadPolicy. Last in the script: the process group stays up until it exits."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from spinlm.workers.fsdp_workers import PolicyWorker
    from spinlm.workers.worker_group import free_port

    backend = "nccl" if device.type == "cuda" else "gloo"
    # NCCL wants the device with its index; gloo none
    extra = {"device_id": torch.device("cuda", torch.cuda.current_device())} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, **extra)
    try:
        release(device)
        worker = PolicyWorker(worker_config(model_dir, tok_dir, device, dtype, run), str(model_dir),
                              keep_opponent=False)
        sharded = sum(isinstance(m, FSDPModule) for m in worker.policy.modules())
        prompts = pairs.prompts[:16]
        rollout, rollout_s = timed_rollout(worker, prompts, max(4, run["response_len"] // 4), device)
        rollout_tokens = sum(len(r[0]) for r in rollout.responses)
        logps = worker.sequence_logps(pairs.prompts[:16], pairs.chosen[:16])
        worker.start_schedule(run["steps"] + 1)
        timed = time_updates(worker, pairs, *ref, run, device, first=0)
        del worker
        offload = check_opponent_offload(model_dir, tok_dir, device, dtype, pairs, run)
    finally:
        dist.destroy_process_group()
    losses = timed.pop("losses")
    return dict(backend=backend, fsdp_modules=sharded, rollout_tokens=rollout_tokens,
                rollout_tokens_per_s=rollout_tokens / rollout_s, **timed, losses=losses,
                max_loss_diff_vs_single=max(abs(a - b) for a, b in zip(losses, single["losses"])),
                max_logp_diff_vs_single=float((logps.double() - ref[0][:16].double()).abs().max()),
                opponent=offload)


def run_trl(model_dir: Path, pairs, run: dict, device: torch.device, dtype: str) -> dict:
    """The same pairs and batch through TRL's DPOTrainer (its loss path: padded batches, full-vocabulary logits),
    with the reference log-probs precomputed as spin mode does. Texts are the ids as words ("t17 t5 ... </s>")
    under a word-level tokenizer, so TRL's tokenisation gives back exactly the same ids."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    import trl
    from trl import DPOConfig, DPOTrainer

    release(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    words = {"<pad>": PAD, "<s>": 1, "</s>": EOS, **{f"t{i}": i for i in range(3, vocab)}}
    wl = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    text = lambda ids: " ".join("</s>" if i == EOS else f"t{i}" for i in ids)  # noqa: E731
    data = {"prompt": [text(p) + " " for p in pairs.prompts], "chosen": [text(c) for c in pairs.chosen],
            "rejected": [text(r) for r in pairs.rejected]}
    steps = run["steps"] + 1
    n = run["batch"] * steps
    data = {k: [v[i % len(v)] for i in range(n)] for k, v in data.items()}
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            synchronize(device)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            synchronize(device)
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, use_cpu=device.type == "cpu", report_to=[], bf16=dtype == "bfloat16",
                         per_device_train_batch_size=run["micro_batch"],
                         gradient_accumulation_steps=run["batch"] // run["micro_batch"], max_steps=steps,
                         learning_rate=1e-5, beta=0.1, loss_type="sigmoid", logging_steps=1, save_strategy="no",
                         max_length=None, precompute_ref_log_probs=True, max_grad_norm=1.0, disable_tqdm=True,
                         seed=0, dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data), processing_class=tok,
                             callbacks=[StepTimer()])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
    peak = peak_gib(device)
    measured = times[1:]
    tokens_per_step = sum(len(p) * 2 + len(c) + len(r) for p, c, r in
                          zip(pairs.prompts, pairs.chosen, pairs.rejected)) * run["batch"] / len(pairs.prompts)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(version=trl.__version__, update_tokens_per_s=tokens_per_step * len(measured) / sum(measured),
                update_step_s=sum(measured) / len(measured),
                update_peak_memory_gb=peak, first_loss=losses[0] if losses else None)


def save(results: dict, path: str | None) -> None:
    """After every section, so that a run stopped at its time limit still leaves what it measured."""
    if path:
        Path(path).write_text(json.dumps(results, indent=2))


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def print_offload(where: str, r: dict) -> None:
    res, off = r["resident"], r["offload"]
    print(f"online_dpo opponent ({where}): peak memory of a step {fmt(res['peak_memory_gb'], '.2f')} GiB resident, "
          f"{fmt(off['peak_memory_gb'], '.2f')} GiB offloaded (parameters on {off['opponent_devices']} between "
          f"passes); opponent log-probs equal the policy's to {res['opponent_max_abs_diff']:.2e} / "
          f"{off['opponent_max_abs_diff']:.2e}; first losses {res['first_loss']:.4f} / {off['first_loss']:.4f}",
          flush=True)


def print_trl(r: dict, spin: dict, peak: float | None) -> None:
    r["mfu"] = spin["flops_per_step"] / r["update_step_s"] / peak if peak else None
    print(f"TRL {r['version']} DPOTrainer update (precomputed reference, micro-batch as spinlm's): "
          f"{r['update_tokens_per_s']:.0f} tokens/s, {r['update_step_s']:.3f}s/step, MFU {percent(r['mfu'])}, "
          f"peak GPU memory {fmt(r['update_peak_memory_gb'], '.2f')} GiB, first loss {fmt(r['first_loss'], '.4f')}; "
          f"spinlm/TRL tokens/s {spin['update_tokens_per_s'] / r['update_tokens_per_s']:.2f}x", flush=True)


def print_fsdp2(r: dict) -> None:
    print(f"FSDP2 ({r['backend']}, 1 rank, {r['fsdp_modules']} FSDP modules): rollout {r['rollout_tokens_per_s']:.0f} "
          f"tokens/s, update {r['update_tokens_per_s']:.0f} tokens/s, peak GPU memory "
          f"{fmt(r['update_peak_memory_gb'], '.2f')} GiB; vs single process: losses within "
          f"{r['max_loss_diff_vs_single']:.2e}, log-probs within {r['max_logp_diff_vs_single']:.3g}", flush=True)
    print_offload("FSDP2", r["opponent"])


def fmt(x, spec: str = ".0f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized model and run (verifies the script)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--profile", metavar="DIR", help="profile one update step and a short rollout into DIR")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        sys.exit("gpu_check.py: no CUDA device; use --tiny to run the CPU-sized check")
    shape, run = (TINY, TINY_RUN) if args.tiny else (QWEN25_05B, FULL_RUN)
    dtype = "bfloat16"  # fp32 master weights, bf16 compute: autocast on one device (CPU autocast too)
    import transformers

    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"gpu_check: {what}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{'tiny' if args.tiny else 'Qwen2.5-0.5B'}-shaped model, random weights, dtype {dtype}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}", flush=True)
    results: dict = {"device": what, "tiny": args.tiny, "torch": torch.__version__,
                     "transformers": transformers.__version__, "run": run}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tok_dir = Path(tmp) / "model", Path(tmp) / "tokenizer"
        t = time.perf_counter()
        build_model_dir(model_dir, shape)
        build_tokenizer_dir(tok_dir)
        results["build_s"] = time.perf_counter() - t

        spin, (pairs, ref_c, ref_r) = run_spinlm(model_dir, tok_dir, run, args, device, dtype)
        results["spinlm"] = spin
        peak = peak_flops(device)
        for prefix in ("", "whole_batch_"):
            spin[prefix + "mfu"] = spin[prefix + "update_flops_per_s"] / peak if peak else None
        print(f"spinlm  rollout (hf engine): {spin['rollout_tokens']} tokens in {spin['rollout_s']:.2f}s = "
              f"{spin['rollout_tokens_per_s']:.0f} tokens/s", flush=True)
        for prefix, what in (("", f"micro-batch {run['micro_batch']} pairs"), ("whole_batch_", "whole batch")):
            print(f"spinlm  update ({what}): {spin[prefix + 'update_tokens_per_s']:.0f} tokens/s, "
                  f"{spin[prefix + 'update_step_s']:.3f}s/step, MFU {percent(spin[prefix + 'mfu'])}, "
                  f"peak GPU memory {fmt(spin[prefix + 'update_peak_memory_gb'], '.2f')} GiB", flush=True)
        print(f"spinlm  losses {', '.join(f'{x:.4f}' for x in spin['losses'])}, master weights "
              f"{spin['master_dtypes']}, attention {spin['attn_implementation']}", flush=True)
        save(results, args.json)

        # Each later section on its own: one that breaks is reported (traceback in the output and the JSON) and
        # the others still run; the exit status says so.
        def section(name, fn, report):
            try:
                results[name] = fn()
            except Exception as exc:  # noqa: BLE001 - recorded, printed, and turned into the exit status below
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                failures.append(name)
                traceback.print_exc()
            else:
                report(results[name])
            save(results, args.json)

        failures: list[str] = []
        section("precision", lambda: check_precision(model_dir, tok_dir, device, pairs, run), lambda r: print(
            f"bf16 vs fp32 log-probs over {r['sequences']} sequences: max |diff| {r['max_abs_diff']:.3g} nats "
            f"(relative {r['max_rel_diff']:.2e}), mean per token {r['mean_abs_diff_per_token']:.2e}, "
            f"margin sign kept {100 * r['margin_sign_agreement']:.0f}%, max margin diff {r['max_margin_diff']:.3g}",
            flush=True))
        section("opponent_offload", lambda: check_opponent_offload(model_dir, tok_dir, device, dtype, pairs, run),
                lambda r: print_offload("single process", r))
        if args.no_trl:
            results["trl"] = "skipped (--no-trl)"
        elif importlib.util.find_spec("trl") is None:
            results["trl"] = "skipped: trl is not installed"
            print("TRL     skipped: trl is not installed", flush=True)
        else:
            section("trl", lambda: run_trl(model_dir, pairs, run, device, dtype), lambda r: print_trl(r, spin, peak))
        section("fsdp2", lambda: check_fsdp2(model_dir, tok_dir, device, dtype, pairs, (ref_c, ref_r), run, spin),
                print_fsdp2)
    print("RESULT " + json.dumps(results))
    if failures:
        sys.exit(f"gpu_check: failed sections: {', '.join(failures)}")


if __name__ == "__main__":
    main()
