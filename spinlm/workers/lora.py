"""LoRA through peft, SPIN style: the opponent is the base model with the adapter switched off, and at the end of
every round the adapter is merged into the base and a fresh one started. So no second model is ever held: the
opponent of round t+1 is exactly the policy of round t, as in full fine-tuning.

A fresh adapter's B is zero, so until the first update the policy IS the base: forwards that need no gradient
(mode spin's generation and reference log-probs at a round's start) then skip the adapter, which gives the same numbers
bit for bit (base + 0) without the adapter's two extra matmuls and two temporaries per linear layer.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


def lora_config(cfg):
    from peft import LoraConfig

    c = cfg.model.lora
    targets = c.target_modules if isinstance(c.target_modules, str) else list(c.target_modules)
    return LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=targets, bias="none")


def add_adapter(model, cfg, seed: int):
    """Inject a fresh adapter into `model` in place (its B is zero, so the policy starts equal to the base) and
    return the PeftModel around it. lora_A is drawn from a private RNG stream seeded by `seed`, so a resumed run
    starts the same adapter an uninterrupted one would."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, lora_config(cfg))


def adapter_is_zero(peft_model) -> bool:
    """Every lora_B is exactly zero: the adapter adds nothing (a fresh one, or one whose updates were all skipped)."""
    return all(not p.any() for n, p in peft_model.named_parameters() if ".lora_B." in n)


def skip_zero_adapter(peft_model):
    """A context in which a zero adapter is switched off (the same outputs, less work); a trained one stays on.
    For forwards without gradients only: a training forward needs the adapter in the graph even while B is zero."""
    return peft_model.disable_adapter() if adapter_is_zero(peft_model) else nullcontext()


def merge_into_base(peft_model):
    """Fold the adapter into the base weights (in place) and remove the LoRA layers: returns the plain model."""
    return peft_model.merge_and_unload()


def plain_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's weights under their plain Hugging Face names, adapter excluded: what a checkpoint holds
    (the adapter is merged and fresh at every save, so this IS the policy)."""
    base = peft_model.get_base_model()
    return {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if ".lora_" not in k}
