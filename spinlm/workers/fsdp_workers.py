"""The worker: one per rank. Holds the policy (and, when needed, the frozen opponent), the optimizer and the
rollout engine; the trainer only sends it token ids and receives numbers back.

With more than one rank (torch.distributed initialised) the policy is sharded with FSDP2: `fully_shard` on every
decoder layer, then on the root (a ResponseLogProbs wrapper, so the lm-head and embeddings are unsharded by the
root's own forward). The opponent is resident only when it must be: in mode spin the opponent IS the policy at the
start of the round, so its log-probs are computed before the first update and kept as numbers (one model in
memory). In online_dpo the opponent lags the policy by up to `ref_update_every` steps, so a frozen copy is kept,
sharded the same way, and refreshed by an in-place copy of the local shards. With algorithm.reference=initial
(either mode) the frozen copy is the start model (model.path) and is never refreshed.
"""
from __future__ import annotations

import math
import os
import resource
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from spinlm.allocator import large_blocks_returned
from spinlm.choices import LR_SCHEDULERS, OPTIMIZERS
from spinlm.crash_points import crash_point
from spinlm.errors import UserError
from spinlm.modeling import (DTYPES, MIXED_PRECISION, check_vocab_fits, disable_dropout, forward_context,
                             enable_gradient_checkpointing, eos_ids_of, load_model, load_tokenizer, master_dtype,
                             pick_device, resolve_attn_implementation, tokenizer_source)
from spinlm.pairs import Pairs
from spinlm.rollout.hf_rollout import Rollout, SamplingParams, generate
from spinlm.run_dir import OPTIM_DIR, is_complete_checkpoint
from spinlm.seeding import GLOBAL, VLLM_ENGINE, seed_for
from spinlm.workers.dp_actor import DataParallelActor, LossSettings
from spinlm.workers.logprobs import ResponseLogProbs, pack_sequences
from spinlm.workers.lora import add_adapter, merge_into_base, plain_state_dict, skip_zero_adapter


def decoder_layers(model) -> torch.nn.ModuleList:
    base = model.base_model
    for name in ("layers", "h", "blocks"):  # Llama/Qwen/Mistral, GPT-2, others
        if isinstance(getattr(base, name, None), torch.nn.ModuleList):
            return getattr(base, name)
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (looked for layers, h, blocks)")


def shard(wrapper: ResponseLogProbs, dtype: str, offload: bool = False) -> None:
    """FSDP2, as torchtitan applies it: each decoder layer, then the root. Mixed precision: fp32 sharded masters,
    all-gathered and computed in bf16/fp16, gradients reduced in fp32. `offload`: the shards live in CPU memory
    (copied to the GPU for each forward): for the frozen opponent, which has no optimizer."""
    kwargs = {}
    if dtype in MIXED_PRECISION:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in decoder_layers(wrapper.model):
        fully_shard(layer, **kwargs)
    fully_shard(wrapper, **kwargs)


def reshard(module) -> None:
    """FSDP2 leaves the root unsharded after a forward (backward would need it at once); after a no-grad forward
    nothing reshards it, and then parameters() would hand out the unsharded tensors: the optimizer, the opponent
    refresh and the state dict must all see the sharded ones."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 parameter (a DTensor); a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def parameter_groups(params, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norm weights and biases (every parameter with fewer than 2 dimensions) are
    exempt, as in the Hugging Face Trainer (and so TRL). Empty groups are left out."""
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(params, actor_cfg) -> torch.optim.Optimizer:
    groups = parameter_groups(params, actor_cfg.weight_decay)
    if actor_cfg.optimizer == "adamw":
        # the fused kernel: on a 25M model's CPU update 15 ms a step where the per-parameter loop took 73 ms;
        # FSDP2's DTensor shards keep the default implementation
        flat = [p for g in groups for p in g["params"]]
        fused = all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") for p in flat) or None
        return torch.optim.AdamW(groups, lr=actor_cfg.lr, betas=tuple(actor_cfg.betas), eps=actor_cfg.eps,
                                 fused=fused)
    if actor_cfg.optimizer == "rmsprop":  # the SPIN paper's optimizer
        return torch.optim.RMSprop(groups, lr=actor_cfg.lr, eps=actor_cfg.eps)
    raise ValueError(f"actor.optimizer={actor_cfg.optimizer!r}: expected {' | '.join(OPTIMIZERS)}")


def build_scheduler(optimizer, kind: str, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    if kind not in LR_SCHEDULERS:
        raise ValueError(f"actor.lr_scheduler={kind!r}: expected {' | '.join(LR_SCHEDULERS)}")
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
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = pick_device(cfg.trainer.device, local_rank)
        # a resumed run starts from a checkpoint, whose own tokenizer comes first (the rule the driver uses too)
        checkpoint = model_path if is_complete_checkpoint(model_path) else None
        self.tokenizer = load_tokenizer(tokenizer_source(cfg.model, checkpoint), cfg.model.trust_remote_code)
        self.attn_implementation = resolve_attn_implementation(cfg.model.attn_implementation, self.device)
        # Single process, mixed precision is torch.autocast around every forward; sharded, FSDP2 casts.
        self.forward_context = lambda: forward_context(cfg.model.dtype, self.device, autocast=not self.distributed)
        self.offload_opponent = cfg.actor.opponent_offload and self.device.type != "cpu"
        self.policy = self._load(model_path)
        self.model = self.policy.model  # the Hugging Face model inside (with LoRA: the adapter is injected into it)
        self.peft = add_adapter(self.model, cfg, seed=seed_for(cfg, GLOBAL)) if cfg.model.lora.rank > 0 else None
        if self.peft is not None and cfg.model.gradient_checkpointing:  # frozen embeddings: checkpointed blocks need
            self.model.enable_input_require_grads()                     # an input that requires grad
        # With LoRA the opponent is the base model with the adapter off: no second copy. algorithm.reference=initial
        # keeps it at model.path, also when the policy resumes from a checkpoint.
        opponent_path = cfg.model.path if cfg.algorithm.reference == "initial" else model_path
        self.opponent = self._load(opponent_path, frozen=True) if keep_opponent and self.peft is None else None
        self.eos_ids = eos_ids_of(self.tokenizer, self.model)
        self.actor = DataParallelActor(
            self.policy, micro_batch_size=cfg.actor.micro_batch_size,
            max_tokens_per_micro_batch=cfg.actor.max_tokens_per_micro_batch,
            block_mask=self.attn_implementation != "flash_attention_2", forward_context=self.forward_context)
        self.optimizer = None
        self.scheduler = None
        self.vllm = self._start_vllm(model_path) if cfg.rollout.engine == "vllm" else None
        self.weights_stale = False  # the policy changed since the vllm engine last received its weights

    def _start_vllm(self, model_path: str):
        from spinlm.rollout.vllm_rollout import VllmRollout

        c, r = self.cfg.model, self.cfg.rollout
        return VllmRollout(model_path, dtype=c.dtype, max_model_len=self.cfg.data.max_prompt_length
                           + self.cfg.data.max_response_length, gpu_memory_utilization=r.gpu_memory_utilization,
                           enforce_eager=r.vllm_enforce_eager, sleep=r.vllm_sleep,
                           seed=seed_for(self.cfg, VLLM_ENGINE, self.rank), distributed=self.distributed, device=self.device,
                           trust_remote_code=c.trust_remote_code)

    def _load(self, path: str, frozen: bool = False) -> ResponseLogProbs:
        c = self.cfg.model
        offload = frozen and self.offload_opponent
        device = "cpu" if offload and not self.distributed else self.device  # FSDP2 offloads from the GPU itself
        model = load_model(path, dtype=master_dtype(c.dtype),
                           attn_implementation=self.attn_implementation, device=device,
                           trust_remote_code=c.trust_remote_code)
        check_vocab_fits(self.tokenizer, model, f"model.path={path}")
        disable_dropout(model)
        if c.gradient_checkpointing and not frozen:
            enable_gradient_checkpointing(model)
        # per-sequence attention calls pay off on CPU; on a GPU they are thousands of tiny launches where one
        # masked call per layer does the work (benchmarks/gpu_check.py --profile)
        wrapper = ResponseLogProbs(model, chunk=self.cfg.actor.logprob_chunk_size,
                                   packed_attention=self.device.type == "cpu")
        if frozen:
            wrapper.requires_grad_(False).eval()
        if self.distributed:
            shard(wrapper, c.dtype, offload=offload)
            self._first_forward(wrapper)
        return wrapper

    @torch.no_grad()
    def _first_forward(self, wrapper) -> None:
        """FSDP2 takes the module of the first forward as its root; make sure that is the wrapper, on every rank."""
        tok = self.tokenizer.eos_token_id
        wrapper(pack_sequences([[tok]], [[tok]], self.device))
        reshard(wrapper)

    # ---- the opponent -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_opponent(self) -> None:
        """opponent := policy, parameter by parameter in place (local shards under FSDP2; no disk, no reallocation).
        With LoRA: the adapter is merged into the base (which is the opponent) and a fresh adapter started, with a
        fresh optimizer that keeps the learning-rate schedule's position. Full fine-tuning in mode spin keeps no
        opponent: nothing to do."""
        if self.peft is not None:
            merge_into_base(self.peft)
            self.peft = add_adapter(self.model, self.cfg, seed=seed_for(self.cfg, GLOBAL))
            if self.scheduler is not None:
                position = self.scheduler.state_dict()
                self.start_schedule(self.total_steps)
                self.scheduler.load_state_dict(position)
                for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                    group["lr"] = lr
            return
        if self.opponent is None:
            return
        for p_opp, p in zip(self.opponent.parameters(), self.policy.parameters()):
            local(p_opp).copy_(local(p))  # shard to shard; also across devices when the opponent is offloaded
        for b_opp, b in zip(self.opponent.buffers(), self.policy.buffers()):
            local(b_opp).copy_(local(b))

    # ---- rollout and log-probs --------------------------------------------------------------------------------------
    @contextmanager
    def gathered(self):
        """Sharded: unshard every FSDP module once, so that generation runs locally with no collectives (ranks
        generate different numbers of tokens); reshard afterwards."""
        fsdp_modules = [m for m in self.policy.modules() if isinstance(m, FSDPModule)]
        for m in fsdp_modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in fsdp_modules:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int, desc: str = "generate",
                 keys: list[int] | None = None) -> Rollout:
        """``keys``: the prompts' stable ids (default: positions); samples depend on (seed, key) only, not the rank."""
        if self.vllm is not None:
            rollout = self._generate_vllm(prompts, keys, params, seed)
        else:
            with self.gathered(), self.forward_context(), self.zero_adapter_skipped():
                rollout = generate(self.model, prompts, params, pad_id=self.tokenizer.pad_token_id,
                                   eos_ids=self.eos_ids, batch_size=self.cfg.rollout.batch_size,
                                   seed=seed, keys=keys, desc=desc, progress=self.rank == 0)
        crash_point("eval" if params.greedy else "generate")
        return rollout

    def _generate_vllm(self, prompts, keys, params: SamplingParams, seed: int) -> Rollout:
        if self.weights_stale or self.vllm.needs_weights:
            self.push_weights()
        return self.vllm.generate(prompts, params, eos_ids=self.eos_ids, seed=seed, keys=keys)

    @torch.no_grad()
    def push_weights(self) -> None:
        """The policy's weights into the colocated vLLM engine, in place (gathered full tensors under FSDP2)."""
        with self.gathered():
            self.vllm.push_weights((name, local(p).detach()) for name, p in self.model.named_parameters())
        self.weights_stale = False

    def sequence_logps(self, prompts, responses, *, opponent: bool = False, desc: str | None = None) -> torch.Tensor:
        desc = desc if self.rank == 0 else None  # one bar, from rank 0
        if opponent and self.peft is not None:  # LoRA: the opponent is the base, i.e. the policy without its adapter
            module = self.policy
            with self.peft.disable_adapter():
                logps = self.actor.sequence_logps(prompts, responses, module=module, desc=desc)
        else:
            if opponent and self.opponent is None:
                raise RuntimeError("sequence_logps(opponent=True) but no resident opponent (mode spin keeps numbers, "
                                   "not a copy)")
            module = self.opponent if opponent else self.policy
            with self.on_device(module if opponent and self.offload_opponent and not self.distributed else None), \
                    self.zero_adapter_skipped():
                logps = self.actor.sequence_logps(prompts, responses, module=module, desc=desc)
        if self.distributed:
            reshard(module)
        return logps

    def zero_adapter_skipped(self):
        """LoRA with a zero adapter (mode spin at a round's start): no-grad forwards run on the base alone."""
        return skip_zero_adapter(self.peft) if self.peft is not None else nullcontext()

    @contextmanager
    def on_device(self, module):
        """An offloaded opponent (single process) visits the GPU only for its log-prob pass."""
        if module is None:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")

    # ---- training -----------------------------------------------------------------------------------------------
    def start_schedule(self, total_steps: int) -> None:
        """A fresh optimizer and warmup + decay schedule over total_steps."""
        a = self.cfg.actor
        self.total_steps = total_steps
        self.optimizer = build_optimizer(self.policy.parameters(), a)
        self.scheduler = build_scheduler(self.optimizer, a.lr_scheduler, total_steps, a.warmup_ratio)

    def has_schedule(self) -> bool:
        return self.optimizer is not None

    def update(self, pairs: Pairs, loss: LossSettings, global_pairs: int,
               ref: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """One optimizer step over this rank's pairs. `ref`: the reference's (chosen, rejected) log-probs; None:
        computed here with the resident opponent, on these very pairs, padding copies included (so every rank runs
        the same number of forwards): the numbers sequence_logps(opponent=True) on the same split gives. A step whose
        reference is the policy itself (loss.reference_is_policy) needs none: the policy's own log-probs stand in."""
        if ref is None and not loss.reference_is_policy:
            ref = (self.sequence_logps(pairs.prompts, pairs.chosen, opponent=True),
                   self.sequence_logps(pairs.prompts, pairs.rejected, opponent=True))
        ref_chosen, ref_rejected = ref if ref is not None else (None, None)
        lr = self.scheduler.get_last_lr()[0]
        # on CPU the tensors live in glibc's heap: without this, freed activations stay in RSS (spinlm/allocator.py)
        with large_blocks_returned() if self.device.type == "cpu" else nullcontext():
            metrics = self.actor.preference_step(pairs, ref_chosen, ref_rejected, loss, self.optimizer,
                                                 grad_clip=self.cfg.actor.grad_clip,
                                                 loss_denominator=global_pairs / self.world_size)
        self.skip_step() if metrics["train/step_skipped"] else self.scheduler.step()
        self.weights_stale |= not metrics["train/step_skipped"]
        crash_point("update")
        metrics["train/lr"] = lr
        return metrics

    def skip_step(self) -> None:
        """Advance the schedule for a step that changed nothing (every prompt's samples tied, or a non-finite
        loss), so that the schedule stays aligned with the step counter."""
        with warnings.catch_warnings():  # torch warns when the schedule moves without an optimizer step: intended here
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def close(self) -> None:
        """Stop what the worker started besides its tensors (the vllm engine)."""
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None

    def peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    # ---- state ----------------------------------------------------------------------------------------------------
    def save(self, path: str, with_optimizer: bool) -> None:
        """The Hugging Face export (gathered, written by rank 0) and, if asked, the sharded optimizer state (online_dpo
        carries it across rounds; spin starts each round with a fresh one, so it is not saved)."""
        path = Path(path)
        if self.distributed:
            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if getattr(self.model.config, "tie_word_embeddings", False):  # saved once, as the input embedding
                head = next(n for n, m in self.model.named_modules() if m is self.model.get_output_embeddings())
                full.pop(f"{head}.weight", None)
        if self.peft is not None:  # merged at every round's end: the base weights are the policy
            full = plain_state_dict(self.peft)
        if self.rank == 0:
            kwargs = {"state_dict": full} if self.distributed or self.peft is not None else {}
            self.model.save_pretrained(path, safe_serialization=True, **kwargs)
            self.tokenizer.save_pretrained(path)
            self.model.generation_config.save_pretrained(path)
        if with_optimizer and self.optimizer is not None:
            state = {"optimizer": get_optimizer_state_dict(self.policy, self.optimizer),
                     "scheduler": self.scheduler.state_dict()}
            dcp.save(state, checkpoint_id=str(path / OPTIM_DIR), no_dist=not self.distributed)
        if self.distributed:
            dist.barrier()

    def load_optimizer(self, path: str, total_steps: int) -> None:
        folder = Path(path) / OPTIM_DIR
        if not folder.exists():
            return
        self.start_schedule(total_steps)
        state = {"optimizer": get_optimizer_state_dict(self.policy, self.optimizer),
                 "scheduler": self.scheduler.state_dict()}
        try:
            dcp.load(state, checkpoint_id=str(folder), no_dist=not self.distributed)
        except (Exception, dcp.CheckpointException) as exc:  # DCP wraps each rank's error (a BaseException)
            failures = getattr(exc, "failures", None)
            reason = next(iter(failures.values()))[0] if failures else exc
            what = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
            raise UserError(f"{folder}: the optimizer state cannot be read ({what}); the "
                            "checkpoint is damaged. Write the name of an earlier checkpoint into "
                            f"{Path(path).parent / 'latest'}, or pick a new trainer.output_dir") from exc
        set_optimizer_state_dict(self.policy, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved learning rate belongs to the saved schedule; a resume with more rounds has a longer one, so
        # the next step's rate is this schedule's at the restored position, not the saved number.
        for group, fn, base in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas, self.scheduler.base_lrs):
            group["lr"] = base * fn(self.scheduler.last_epoch)
