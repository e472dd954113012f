"""The worker: one per device. Holds the policy (and, when needed, the frozen opponent), the optimizer and the
rollout engine; the trainer only sends it token ids and receives numbers back.

The opponent is resident only when it must be: in mode spin the opponent IS the policy at the start of the round,
so its log-probs for every pair are computed before the first update and kept as numbers (one model in memory).
In online_dpo the opponent lags the policy by up to `ref_update_every` steps, so a frozen copy is kept and
refreshed by an in-place parameter copy.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spinlm.crash_points import crash_point
from spinlm.evaluate import eos_ids_of, evaluate_accuracy
from spinlm.rollout.hf_rollout import Rollout, SamplingParams, generate
from spinlm.workers.dp_actor import DataParallelActor, LossSettings, Pairs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:  # many chat models ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, *, dtype: str, attn_implementation: str, device, trust_remote_code: bool = False):
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    return model.to(device)


def build_optimizer(model, actor_cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if actor_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=actor_cfg.lr, betas=tuple(actor_cfg.betas), eps=actor_cfg.eps,
                                 weight_decay=actor_cfg.weight_decay)
    if actor_cfg.optimizer == "rmsprop":  # the SPIN paper's optimizer
        return torch.optim.RMSprop(params, lr=actor_cfg.lr, eps=actor_cfg.eps, weight_decay=actor_cfg.weight_decay)
    raise ValueError(f"actor.optimizer={actor_cfg.optimizer!r}: expected adamw | rmsprop")


def build_scheduler(optimizer, kind: str, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(math.ceil(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class PolicyWorker:
    def __init__(self, cfg, model_path: str, *, keep_opponent: bool):
        self.cfg = cfg
        self.device = pick_device(cfg.trainer.device)
        tok_path = cfg.model.tokenizer_path or model_path
        self.tokenizer = load_tokenizer(tok_path, cfg.model.trust_remote_code)
        self.model = load_model(model_path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                                device=self.device, trust_remote_code=cfg.model.trust_remote_code)
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.opponent = self._frozen_copy() if keep_opponent else None
        self.actor = DataParallelActor(
            self.model, micro_batch_size=cfg.actor.micro_batch_size,
            max_tokens_per_micro_batch=cfg.actor.max_tokens_per_micro_batch,
            logprob_chunk_size=cfg.actor.logprob_chunk_size,
            block_mask=cfg.model.attn_implementation != "flash_attention_2")
        self.eos_ids = eos_ids_of(self.tokenizer, self.model)
        self.optimizer = None
        self.scheduler = None

    # ---- the opponent -------------------------------------------------------------------------------------------
    def _frozen_copy(self):
        opponent = copy.deepcopy(self.model)
        opponent.requires_grad_(False)
        return opponent.eval()

    @torch.no_grad()
    def refresh_opponent(self) -> None:
        """opponent := policy, parameter by parameter in place (no disk, no reallocation)."""
        for p_opp, p in zip(self.opponent.parameters(), self.model.parameters()):
            p_opp.copy_(p)
        for b_opp, b in zip(self.opponent.buffers(), self.model.buffers()):
            b_opp.copy_(b)

    # ---- rollout and log-probs --------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int, desc: str = "generate") -> Rollout:
        rollout = generate(self.model, prompts, params, pad_id=self.tokenizer.pad_token_id, eos_ids=self.eos_ids,
                           batch_size=self.cfg.rollout.batch_size, seed=seed, desc=desc)
        crash_point("generate")
        return rollout

    def sequence_logps(self, prompts, responses, *, opponent: bool = False) -> torch.Tensor:
        model = self.opponent if opponent else self.model
        if opponent and model is None:
            raise RuntimeError("sequence_logps(opponent=True) but no resident opponent (mode spin keeps numbers, not a copy)")
        return self.actor.sequence_logps(prompts, responses, model=model)

    def evaluate(self, items, reward_fn) -> dict[str, float]:
        return evaluate_accuracy(self.model, self.tokenizer, items, reward_fn,
                                 max_new_tokens=self.cfg.data.max_response_length, batch_size=self.cfg.rollout.batch_size)

    # ---- training -----------------------------------------------------------------------------------------------
    def start_schedule(self, total_steps: int) -> None:
        """A fresh optimizer and warmup + decay schedule over total_steps."""
        a = self.cfg.actor
        self.optimizer = build_optimizer(self.model, a)
        self.scheduler = build_scheduler(self.optimizer, a.lr_scheduler, total_steps, a.warmup_ratio)

    def update(self, pairs: Pairs, ref_chosen, ref_rejected, loss: LossSettings) -> dict[str, float]:
        lr = self.scheduler.get_last_lr()[0]
        metrics = self.actor.preference_step(pairs, ref_chosen, ref_rejected, loss, self.optimizer,
                                             grad_clip=self.cfg.actor.grad_clip)
        self.scheduler.step()
        metrics["train/lr"] = lr
        return metrics

    def skip_step(self) -> None:
        """Advance the schedule for a step that had nothing to learn from (every prompt's samples tied)."""
        with warnings.catch_warnings():  # torch warns when the schedule moves without an optimizer step: intended here
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    # ---- state ----------------------------------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        self.model.generation_config.save_pretrained(path)

    def training_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def load_training_state(self, state: dict, total_steps: int) -> None:
        if state.get("optimizer") is not None:
            self.start_schedule(total_steps)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
