"""Supervised fine-tuning with a response-only loss: the warm start SPIN begins from (`spinlm sft`).

A training sequence is ``prompt_ids + response_ids`` (the prompt rendered with the chat template and the
generation prompt, the response with EOS), exactly as generation and preference training see it. Only the
response tokens, EOS included, are targets; prompt and padding positions get label -100.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from spinlm.config_check import validate_sft
from spinlm.data.example import DataError
from spinlm.data.items import load_items, load_val_items
from spinlm.modeling import (check_vocab_fits, forward_context, enable_gradient_checkpointing, load_model,
                             load_tokenizer, master_dtype, pick_device, tokenizer_source)
from spinlm.seeding import GLOBAL, seed_for

if TYPE_CHECKING:
    from spinlm.data.dataset import TokenizedExample

IGNORE_INDEX = -100

log = logging.getLogger(__name__)


def sft_batch(items: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding).

    Labels are unshifted (the model shifts them), so label[t] = input_ids[t] on response positions.
    """
    seqs = [list(it.prompt_ids) + list(it.response_ids) for it in items]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, (it, seq) in enumerate(zip(items, seqs)):
        n_prompt = len(it.prompt_ids)
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
        labels[row, n_prompt: len(seq)] = torch.tensor(it.response_ids, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of indices: a fresh permutation per pass over the data, carried across pass boundaries."""
    buffer: list[int] = []
    while True:
        while len(buffer) < batch_size:
            buffer.extend(torch.randperm(n, generator=generator).tolist())
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def _check_items(items: list[TokenizedExample]) -> None:
    if not items:
        raise DataError("sft: no training examples (after loading, max_examples and truncation)")
    for it in items:
        if not it.response_ids:
            raise DataError(f"{it.example.origin}: SFT needs a ground-truth response, but this row has none "
                            f"(give a messages, plain-with-response or verl-with-extra_info.answer row)")


def train_sft(model, tokenizer, items: list[TokenizedExample], *, steps: int, batch_size: int, lr: float,
              warmup_ratio: float, seed: int, grad_clip: float = 1.0, weight_decay: float = 0.0,
              log_every: int = 50, precision_context=nullcontext) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps (linear warmup, then cosine decay). Returns per-step losses.

    Deterministic given ``seed``: it seeds torch's global RNG (dropout, if any) and a private generator for the
    batch order. The loss of a step is the mean cross-entropy over the response tokens of its batch.
    ``precision_context``: a zero-argument callable giving the context each forward and loss run under
    (``modeling.forward_context``: autocast and attention backends).
    """
    for name, value, ok in (("steps", steps, steps >= 1), ("batch_size", batch_size, batch_size >= 1),
                            ("lr", lr, lr > 0), ("warmup_ratio", warmup_ratio, 0 <= warmup_ratio < 1),
                            ("grad_clip", grad_clip, grad_clip >= 0), ("log_every", log_every, log_every >= 0)):
        if not ok:
            raise ValueError(f"train_sft: {name}={value!r} is out of range")
    _check_items(items)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("train_sft: the tokenizer has neither pad_token nor eos_token; cannot pad batches")

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(warmup_ratio * steps)), steps)

    model.train()
    losses: list[float] = []
    batches = _batches(len(items), batch_size, generator)
    bar = tqdm(range(steps), desc="sft", unit="step", mininterval=1.0)
    for step in bar:
        batch = {k: v.to(device) for k, v in sft_batch([items[i] for i in next(batches)], pad_id).items()}
        with precision_context():  # mixed precision: the forward in bf16/fp16, the fp32 weights updated outside
            loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"sft step {step + 1}: loss is {loss.item()} (try a lower sft.lr)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            recent = losses[-log_every:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    bar.close()
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------- `spinlm sft`

def _load_model_and_tokenizer(cfg: DictConfig, device: torch.device):
    tokenizer = load_tokenizer(tokenizer_source(cfg.model), cfg.model.trust_remote_code)
    model = load_model(str(cfg.model.path), dtype=master_dtype(cfg.model.dtype),
                       attn_implementation=cfg.model.attn_implementation, device=device,
                       trust_remote_code=cfg.model.trust_remote_code)
    check_vocab_fits(tokenizer, model, f"model.path={cfg.model.path}")
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def run_sft_from_config(cfg: DictConfig) -> dict[str, Any]:
    """`spinlm sft`: load model and data, train, save model + tokenizer to sft.output_dir.

    Returns a summary: steps, final_loss (mean of the last 10 steps), seconds, output_dir, and, when
    data.val_files is set, val/acc after (and before, with sft.eval_before) (greedy exact match with the configured reward).
    """
    validate_sft(cfg)  # every rule, before anything heavy
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    device = pick_device(cfg.trainer.device)
    out_dir = Path(cfg.sft.output_dir or Path(cfg.trainer.output_dir) / "sft")

    model, tokenizer = _load_model_and_tokenizer(cfg, device)
    train_items, _ = load_items(cfg.data, tokenizer, cfg.data.train_files, need_response=False,
                                limit=cfg.sft.max_examples)
    _check_items(train_items)
    log.info("sft: %d training examples, %d steps of %d, device %s", len(train_items), cfg.sft.steps,
             cfg.sft.batch_size, device)

    val_items, reward_fn = None, None
    summary: dict[str, Any] = {}
    if cfg.data.val_files:
        from spinlm.evaluate import evaluate_accuracy
        from spinlm.rewards import get_reward_fn

        val_items = load_val_items(cfg.data, tokenizer)  # the prompts the trainer's val/acc scores
        reward_fn = get_reward_fn(cfg.reward)

        def accuracy() -> float:
            metrics = evaluate_accuracy(model, tokenizer, val_items, reward_fn,
                                        max_new_tokens=cfg.data.max_response_length,
                                        batch_size=cfg.rollout.batch_size)
            return metrics["val/acc"]

        if cfg.sft.eval_before:
            summary["val/acc_before"] = accuracy()
            log.info("sft: val/acc before %.4f (%d prompts, greedy)", summary["val/acc_before"], len(val_items))

    start = time.perf_counter()
    losses = train_sft(model, tokenizer, train_items, steps=cfg.sft.steps, batch_size=cfg.sft.batch_size,
                       lr=float(cfg.sft.lr), warmup_ratio=float(cfg.sft.warmup_ratio), seed=seed_for(cfg, GLOBAL),
                       log_every=max(1, cfg.sft.steps // 10),
                       precision_context=lambda: forward_context(cfg.model.dtype, device))
    summary.update(steps=len(losses), final_loss=sum(losses[-10:]) / len(losses[-10:]),
                   seconds=time.perf_counter() - start, output_dir=str(out_dir))
    log.info("sft: %d steps in %.1fs, final loss %.4f", len(losses), summary["seconds"], summary["final_loss"])

    if val_items is not None:
        summary["val/acc_after"] = accuracy()
        log.info("sft: val/acc after %.4f", summary["val/acc_after"])

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("sft: saved model and tokenizer to %s", out_dir)
    return summary
