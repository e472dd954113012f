"""The `vllm` rollout engine (optional extra, `pip install -e ".[vllm]"`): a vLLM engine colocated with training
in each rank's own process, fed the policy's weights in place.

- Colocated: the engine core runs inside this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a weight push hands
  vLLM the policy's own tensors by reference: no copy through a pipe, never through disk. Under torch.distributed
  each rank runs its own engine (`external_launcher`, as TRL's colocate mode does) on its own share of the prompts.
- Weights: the engine loads the starting checkpoint once; after that the worker marks the weights stale whenever an
  update (or a resume) changes them, and the next rollout first pushes them with vLLM's `reload_weights`, which
  also redoes any post-load processing (fused QKV / gate-up, the CPU backend's repacked layouts).
- Memory: `rollout.gpu_memory_utilization` caps what vLLM takes of the GPU; with `rollout.vllm_sleep` (and a vLLM
  that has sleep mode, on CUDA) the engine sleeps between rollouts, level 2: its KV cache and weights are released,
  and the weights are pushed again on waking, which they would be anyway after an update.
- Same contract as the hf engine: the same SamplingParams (greedy = temperature 0; temperature, top-k then top-p;
  n samples per prompt), every EOS id a stop token, each response cut after its first EOS (inclusive) and flagged
  ended, so the response masks built from it are the same.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from spinlm.errors import UserError
from spinlm.extras import install_hint
from spinlm.rollout.hf_rollout import Rollout, SamplingParams, check_params, request_seeds


def vllm_sampling_params(params: SamplingParams, *, stop_ids: set[int], seed: int | None):
    """Our SamplingParams as vLLM's (top_k 0 is "off" in both)."""
    from vllm import SamplingParams as VllmParams

    common = dict(max_tokens=params.max_new_tokens, stop_token_ids=sorted(stop_ids), detokenize=False, seed=seed)
    if params.greedy:
        return VllmParams(n=1, temperature=0.0, **common)
    return VllmParams(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, **common)


def cut_after_eos(tokens: list[int], eos_ids: set[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """A response as the hf engine returns it: up to and including its first EOS, at most max_new_tokens long."""
    for i, t in enumerate(tokens[:max_new_tokens]):
        if t in eos_ids:
            return list(tokens[: i + 1]), True
    return list(tokens[:max_new_tokens]), False


def refresh_tied_lm_head(worker) -> bool:
    """Runs inside vLLM's worker after a reload. A tied lm-head is not in the checkpoint names, so vLLM's in-place
    reload skips its post-load step; on the CPU backend that step builds the packed GEMM kernel the head computes
    with, which would keep the OLD weights (measured: greedy outputs then differ from the pushed model's). Redo it
    from the freshly loaded (shared) embedding; on GPU the step has nothing to do."""
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if weight is None or not any(p is weight for n, p in model.named_parameters() if not n.startswith("lm_head.")):
        return False  # an untied head was loaded (and processed) by the reload itself
    head.quant_method.process_weights_after_loading(head)
    return True


class VllmRollout:
    def __init__(self, model_path: str, *, dtype: str, max_model_len: int, gpu_memory_utilization: float,
                 enforce_eager: bool, sleep: bool, seed: int, distributed: bool, device: torch.device,
                 trust_remote_code: bool = False):
        # the engine core in this process: weight pushes pass tensors by reference (and no extra process to spawn)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise UserError(f"rollout.engine=vllm: cannot import vllm ({exc}); install the extra with "
                            f"{install_hint('vllm')} (on CPU: scripts/setup_vllm_env.sh)") from exc
        self.sleep_enabled = sleep and device.type == "cuda" and hasattr(LLM, "sleep")
        kwargs = dict(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                      gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                      skip_tokenizer_init=True, trust_remote_code=trust_remote_code,
                      enable_sleep_mode=self.sleep_enabled)
        if device.type == "cpu":
            # Chunked prefill splits a prompt over scheduler steps, and vLLM then rewinds the request's seeded
            # generator, which a CPU generator cannot do ("CPU Generator does not use offset"): every batch with
            # more prompt tokens than one step takes failed. Whole prompts per step instead.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        if distributed:  # each rank one engine, inside the process group torch.distributed already set up
            kwargs["distributed_executor_backend"] = "external_launcher"
        # In a single process vLLM sets up a one-rank torch.distributed group of its own; close() takes it down.
        self.owns_process_group = not torch.distributed.is_initialized()
        self.llm = LLM(**kwargs)
        self.asleep = False
        self.pushes = 0
        self.sleep()

    def close(self) -> None:
        """Free the engine (and the one-rank process group it made), so the process is as it was before."""
        if self.llm is None:
            return
        self.llm = None
        if self.owns_process_group:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()

    # ---- memory between phases --------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Release the KV cache and weights (level 2) while training runs; a no-op without sleep mode."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def wake_weights(self) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["weights"])

    def wake_cache(self) -> None:
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    @property
    def needs_weights(self) -> bool:
        """Level-2 sleep dropped the weights: they must be pushed before the next rollout even if unchanged."""
        return self.asleep

    # ---- weights -----------------------------------------------------------------------------------------------
    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load the policy's current weights (Hugging Face names) into the engine in place."""
        self.wake_weights()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        self.llm.collective_rpc(refresh_tied_lm_head)
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.pushes += 1

    # ---- rollout -----------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, *, eos_ids: set[int],
                 seed: int | None, keys: list[int] | None = None) -> Rollout:
        """``keys``: the prompts' stable ids (default: positions); each request's seed is a hash of (seed, key), the
        hf engine's stream rule, so a prompt's samples do not depend on its batch, rank or world size."""
        check_params(params)
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"generate: prompt {i} is empty; expected at least one token")
        self.wake_cache()
        try:
            requests = [{"prompt_token_ids": list(p)} for p in prompts]
            keys = list(range(len(prompts))) if keys is None else list(keys)
            seeds = [None] * len(prompts) if seed is None else request_seeds(seed, keys)
            per_prompt = [vllm_sampling_params(params, stop_ids=eos_ids, seed=s) for s in seeds]
            outputs = self.llm.generate(requests, per_prompt, use_tqdm=False) if prompts else []
        finally:
            self.sleep()
        responses, ended = [], []
        for out in outputs:
            cut = [cut_after_eos(list(o.token_ids), eos_ids, params.max_new_tokens) for o in out.outputs]
            responses.append([r for r, _ in cut])
            ended.append([e for _, e in cut])
        return Rollout(responses, ended)
