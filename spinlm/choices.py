"""The fixed sets of names that config keys take, each defined once.

The config check (spinlm.config_check) validates against these tuples, and the modules that act on a value import
the same tuple, so a new choice is added in one place. The order is the order messages list them in. This module
imports nothing, so the config check stays free of torch.
"""
from __future__ import annotations

ALGORITHM_MODES = ("spin", "online_dpo")                      # algorithm.mode
REFERENCE_MODES = ("refresh", "initial")                      # algorithm.reference
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exponential", "robust", "sppo_hard", "bco_pair", "sft")  # algorithm.loss_type

DATA_FORMATS = ("messages", "verl", "spin", "plain", "preference")  # the row formats spinlm.data.formats reads
DATA_FORMAT_CHOICES = ("auto", *DATA_FORMATS)                 # data.format: auto detects each file's format
TRUNCATION_MODES = ("error", "left", "right", "drop")         # data.truncation

OPTIMIZERS = ("adamw", "rmsprop")                             # actor.optimizer
LR_SCHEDULERS = ("linear", "cosine", "constant")              # actor.lr_scheduler (all with warmup)

RESUME_MODES = ("auto", "disable")                            # trainer.resume
DEVICES = ("auto", "cpu", "cuda")                             # trainer.device
LAUNCHERS = ("auto", "local", "ray")                          # trainer.launcher
LOGGERS = ("console", "jsonl", "tensorboard", "wandb", "mlflow")  # entries of trainer.logger

DTYPE_NAMES = ("float32", "bfloat16", "float16")              # model.dtype
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # model.attn_implementation

ROLLOUT_ENGINES = ("hf", "vllm")                              # rollout.engine
GSM8K_METHODS = ("strict", "flexible")                        # reward.gsm8k_method
