"""The device check: a Qwen2.5-0.5B-shaped model (random weights, built from its config, no hub) through a few SPIN
steps with the hf engine on one GPU, in one process, with the trainer's own PolicyWorker. Prints rollout and update
tokens/s, the update's MFU and peak GPU memory, then the same update through TRL's DPOTrainer (when trl and datasets
import), and one JSON line with every number.

Needs only torch, transformers, tokenizers and omegaconf (no ray, hydra or vLLM). `--tiny` shrinks everything so the
whole path runs on a CPU in well under a minute (that is how it is tested); benchmarks/gpu_check.sh is the launcher.

    python benchmarks/gpu_check.py [--tiny] [--gradient-checkpointing] [--no-trl] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's spinlm, installed or not

import torch  # noqa: E402

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


def run_spinlm(model_dir: Path, tok_dir: Path, run: dict, args, device: torch.device, dtype: str) -> dict:
    from spinlm.config import load_config
    from spinlm.rollout.hf_rollout import SamplingParams
    from spinlm.pairs import Pairs
    from spinlm.workers.dp_actor import LossSettings
    from spinlm.workers.fsdp_workers import PolicyWorker

    cfg = load_config([
        f"model.path={model_dir}", f"model.tokenizer_path={tok_dir}", f"model.dtype={dtype}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}", f"trainer.device={device.type}",
        "actor.lr=1e-5", "actor.warmup_ratio=0", "actor.lr_scheduler=constant",
        f"actor.micro_batch_size={run['micro_batch']}", f"rollout.batch_size={run['prompts']}"])
    torch.manual_seed(0)
    t = time.perf_counter()
    worker = PolicyWorker(cfg, str(model_dir), keep_opponent=False)
    load_s = time.perf_counter() - t
    vocab = worker.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = random_ids(gen, run["prompts"], run["prompt_len"], vocab)

    # rollout: the first (short) call warms up kernels and the allocator
    worker.generate(prompts[:4], SamplingParams(max_new_tokens=4), seed=0, desc="warm-up")
    synchronize(device)
    t = time.perf_counter()
    rollout = worker.generate(prompts, SamplingParams(max_new_tokens=run["response_len"], temperature=1.0), seed=1)
    synchronize(device)
    rollout_s = time.perf_counter() - t
    samples = [r[0] for r in rollout.responses]
    rollout_tokens = sum(map(len, samples))

    # SPIN: chosen = a "ground truth" response, rejected = the model's own sample; opponent log-probs as numbers
    chosen = random_ids(gen, len(prompts), run["response_len"], vocab)
    pairs = Pairs(prompts, chosen, samples)
    ref_c = worker.sequence_logps(pairs.prompts, pairs.chosen)
    ref_r = worker.sequence_logps(pairs.prompts, pairs.rejected)
    steps = run["steps"] + 1  # the first step is a warm-up and is not measured
    worker.start_schedule(steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, tokens, losses, flops = [], [], [], []
    b = run["batch"]
    for s in range(steps):
        idx = [(s * b + i) % len(pairs) for i in range(b)]
        synchronize(device)
        t = time.perf_counter()
        m = worker.update(pairs.select(idx), LossSettings(beta=0.1), b, ref=(ref_c[idx], ref_r[idx]))
        synchronize(device)
        if s:
            times.append(time.perf_counter() - t)
            tokens.append(m["train/tokens"])
            response_tokens = sum(len(chosen[i]) + len(samples[i]) for i in idx)
            flops.append(flops_per_update(worker.model, int(m["train/tokens"]), response_tokens))
        losses.append(m["loss"])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    master = {str(p.dtype) for p in worker.policy.parameters()}
    pairs_out = (pairs, ref_c, ref_r)
    result = dict(load_s=load_s, rollout_tokens=rollout_tokens, rollout_s=rollout_s,
                  rollout_tokens_per_s=rollout_tokens / rollout_s, update_tokens_per_s=sum(tokens) / sum(times),
                  update_step_s=sum(times) / len(times), update_flops_per_s=sum(flops) / sum(times),
                  update_peak_memory_gb=peak / 2**30 if peak is not None else None, losses=losses,
                  master_dtypes=sorted(master), attn_implementation=worker.attn_implementation,
                  flops_per_step=sum(flops) / len(flops))
    del worker
    return result, pairs_out


def check_opponent_offload(model_dir: Path, tok_dir: Path, device: torch.device, dtype: str, pairs) -> dict:
    """online_dpo's resident opponent, offloaded to CPU: same log-probs as the policy (same weights), and back in
    CPU memory after its pass."""
    from spinlm.config import load_config
    from spinlm.workers.fsdp_workers import PolicyWorker

    cfg = load_config([f"model.path={model_dir}", f"model.tokenizer_path={tok_dir}", f"model.dtype={dtype}",
                       f"trainer.device={device.type}", "actor.opponent_offload=true", "actor.micro_batch_size=8"])
    worker = PolicyWorker(cfg, str(model_dir), keep_opponent=True)
    prompts, chosen = pairs.prompts[:8], pairs.chosen[:8]
    policy = worker.sequence_logps(prompts, chosen)
    opponent = worker.sequence_logps(prompts, chosen, opponent=True)
    where = {str(p.device) for p in worker.opponent.parameters()}
    result = dict(opponent_devices=sorted(where), opponent_max_abs_diff=float((policy - opponent).abs().max()))
    del worker
    return result


def run_trl(model_dir: Path, pairs, run: dict, device: torch.device, dtype: str) -> dict:
    """The same pairs and batch through TRL's DPOTrainer (its loss path: padded batches, full-vocabulary logits),
    with the reference log-probs precomputed as spin mode does. Texts are the ids as words ("t17 t5 ... </s>")
    under a word-level tokenizer, so TRL's tokenisation gives back exactly the same ids."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

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
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    measured = times[1:]
    tokens_per_step = sum(len(p) * 2 + len(c) + len(r) for p, c, r in
                          zip(pairs.prompts, pairs.chosen, pairs.rejected)) * run["batch"] / len(pairs.prompts)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(update_tokens_per_s=tokens_per_step * len(measured) / sum(measured),
                update_step_s=sum(measured) / len(measured),
                update_peak_memory_gb=peak / 2**30 if peak is not None else None, first_loss=losses[0] if losses else None)


def fmt(x, spec: str = ".0f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized model and run (verifies the script)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    parser.add_argument("--json", help="also write the results here")
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

        spin, (pairs, _, _) = run_spinlm(model_dir, tok_dir, run, args, device, dtype)
        results["spinlm"] = spin
        peak = peak_flops(device)
        mfu = spin["update_flops_per_s"] / peak if peak else None
        results["spinlm"]["mfu"] = mfu
        print(f"spinlm  rollout (hf engine): {spin['rollout_tokens']} tokens in {spin['rollout_s']:.2f}s = "
              f"{spin['rollout_tokens_per_s']:.0f} tokens/s", flush=True)
        print(f"spinlm  update: {spin['update_tokens_per_s']:.0f} tokens/s, {spin['update_step_s']:.3f}s/step, "
              f"MFU {fmt(mfu and 100 * mfu, '.1f')}{'%' if mfu else ''}, peak GPU memory {fmt(spin['update_peak_memory_gb'], '.2f')} GiB, "
              f"losses {', '.join(f'{x:.4f}' for x in spin['losses'])}, master weights {spin['master_dtypes']}, "
              f"attention {spin['attn_implementation']}", flush=True)

        offload = check_opponent_offload(model_dir, tok_dir, device, dtype, pairs)
        results["opponent_offload"] = offload
        print(f"opponent offload: parameters on {offload['opponent_devices']} between passes, log-probs equal the "
              f"policy's to {offload['opponent_max_abs_diff']:.2e}", flush=True)

        if args.no_trl:
            results["trl"] = "skipped (--no-trl)"
        else:
            try:
                import trl
            except ImportError as exc:
                results["trl"] = f"skipped: {exc}"
                print(f"TRL     skipped: {exc}", flush=True)
            else:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                trl_out = run_trl(model_dir, pairs, run, device, dtype)
                trl_mfu = spin["flops_per_step"] / trl_out["update_step_s"] / peak if peak else None
                trl_out.update(version=trl.__version__, mfu=trl_mfu)
                results["trl"] = trl_out
                print(f"TRL {trl.__version__} DPOTrainer update (precomputed reference): "
                      f"{trl_out['update_tokens_per_s']:.0f} tokens/s, {trl_out['update_step_s']:.3f}s/step, "
                      f"MFU {fmt(trl_mfu and 100 * trl_mfu, '.1f')}{'%' if trl_mfu else ''}, peak GPU memory "
                      f"{fmt(trl_out['update_peak_memory_gb'], '.2f')} GiB, first loss {fmt(trl_out['first_loss'], '.4f')}; "
                      f"spinlm/TRL tokens/s {spin['update_tokens_per_s'] / trl_out['update_tokens_per_s']:.2f}x",
                      flush=True)
    print("RESULT " + json.dumps(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
