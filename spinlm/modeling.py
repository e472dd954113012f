"""How a model is loaded: its device, tokenizer, dtypes (master and compute), attention implementation, dropout,
gradient checkpointing and EOS ids. The one place every part of spinlm (the worker, sft, evaluate, the reward
model) resolves these, so they all agree."""
from __future__ import annotations

import importlib.util
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from spinlm.choices import DTYPE_NAMES
from spinlm.errors import UserError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # model.dtype -> torch dtype
MIXED_PRECISION = ("bfloat16", "float16")  # trained with fp32 master weights, computed in this dtype


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


# tokenizer_class values that mean "exactly the tokenizer.json next to me", with no model-specific class
GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def tokenizer_source(model_cfg, checkpoint: str | Path | None = None) -> str:
    """Where the tokenizer comes from, one rule for the trainer, its workers and evaluate: the checkpoint's own
    (every checkpoint saves the tokenizer it was trained with), else ``model.tokenizer_path``, else ``model.path``."""
    if checkpoint is not None and (Path(checkpoint) / "tokenizer_config.json").is_file():
        return str(checkpoint)
    return str(model_cfg.tokenizer_path or model_cfg.path)


def one_line(exc: BaseException) -> str:
    """A library's multi-line error message, on one line (it is quoted inside ours)."""
    return " ".join(str(exc).split())


def load_tokenizer(path: str, trust_remote_code: bool = False):
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # no tokenizer files, a corrupt tokenizer.json, an unreachable hub
        raise UserError(f"{path}: cannot load a tokenizer from it ({type(exc).__name__}: {one_line(exc)}); point "
                        "model.tokenizer_path at a folder with tokenizer.json and tokenizer_config.json") from exc
    declared = _declared_tokenizer_class(path)
    if declared in GENERIC_TOKENIZER_CLASSES and type(tok).__name__ not in GENERIC_TOKENIZER_CLASSES:
        # transformers 5 swaps a saved generic tokenizer for the model type's own class for some model types
        # (qwen2: Qwen2Tokenizer, with another pre-tokenizer); the saved tokenizer.json is what the data was made for
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    if tok.pad_token_id is None:  # many chat models ship without one; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def _declared_tokenizer_class(path: str) -> str | None:
    config = Path(path) / "tokenizer_config.json"
    if not config.is_file():  # a hub id, or a folder without one: nothing declared locally
        return None
    return json.loads(config.read_text()).get("tokenizer_class")


def resolve_attn_implementation(name: str, device: torch.device) -> str:
    """`auto`: flash_attention_2 on CUDA when the flash-attn package is installed, else sdpa."""
    if name != "auto":
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def master_dtype(dtype: str) -> str:
    """The dtype (a DTYPES key) weights are stored and updated in: fp32 under mixed precision (bf16/fp16 is only the
    compute dtype)."""
    return "float32" if dtype in MIXED_PRECISION else dtype


def load_model(path: str, *, dtype: str, attn_implementation: str, device, trust_remote_code: bool = False):
    """Weights in `dtype` as given (the caller picks master_dtype() for a model that trains)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
            attn_implementation=resolve_attn_implementation(attn_implementation, torch.device(device)))
    except (OSError, SafetensorError) as exc:  # no weights, a truncated or corrupt safetensors file, no network
        raise UserError(f"{path}: cannot load the model weights ({type(exc).__name__}: {one_line(exc)}). A "
                        "checkpoint cut short (a full disk, a copy interrupted) cannot be repaired: use an earlier "
                        "checkpoint or the original model folder") from exc
    return model.to(device)


def check_vocab_fits(tokenizer, model, where: str) -> None:
    """A token id past the embedding table would index out of range on the first forward (or silently, on GPU)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} "
                        "rows: they do not belong together (check model.tokenizer_path), or resize the embedding "
                        "before training (model.resize_token_embeddings(len(tokenizer)), then save)")


def disable_dropout(model) -> None:
    """Preference losses compare the policy's log-probs with the opponent's, which are computed without dropout: with
    dropout on (GPT-2 ships 0.1) the two differ at equal weights and the first step's loss is not log 2. TRL's
    DPOTrainer turns dropout off by default for the same reason."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # Llama/Qwen/Mistral read a float, not a module
            m.attention_dropout = 0.0


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward. Non-reentrant checkpointing: the variant that
    composes with FSDP2 and with inputs that need no grad. (transformers 5.2x renamed the method.)"""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def autocast_context(dtype: str, device: torch.device):
    """Single-process mixed precision: fp32 master weights, forward matmuls in bf16/fp16 under torch.autocast.
    (Sharded, FSDP2's MixedPrecisionPolicy casts instead, so this is not used there.)"""
    if dtype not in MIXED_PRECISION:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def sdpa_backends(device: torch.device):
    """On CUDA, scaled_dot_product_attention without its cuDNN backend. torch tries cuDNN first on Hopper, and cuDNN
    builds a graph for every new shape: a decode step's key length changes every step, and each call cost 3 ms of
    CPU on an H200 (60% of a rollout's wall time, for microseconds of GPU work; benchmarks/gpu_check.py --profile).
    Flash, memory-efficient and math attention stay available. Elsewhere: nothing changes."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@contextmanager
def forward_context(dtype: str, device: torch.device, *, autocast: bool = True):
    """What every forward of the worker runs under: autocast (single-process mixed precision; `autocast=False`
    when FSDP2 casts instead) and the attention backends for the device."""
    with (autocast_context(dtype, device) if autocast else nullcontext()), sdpa_backends(device):
        yield


def eos_ids_of(tokenizer, model=None) -> set[int]:
    """The tokenizer's EOS and every EOS id the model's generation config names (chat models often add one)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return {i for i in ids if i is not None}
