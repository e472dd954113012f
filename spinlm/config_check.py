"""The config check: every cross-field rule of a run's config, checked before any model or data loads.

``check_config`` returns ALL problems at once, each naming the key, its value and the rule broken, so a user
fixes a config in one pass instead of one crash per launch. ``check_eval_config`` and ``check_sft_config`` apply
the rule sets of `spinlm evaluate` and `spinlm sft` to the same reading of the tree (unknown keys, types, NaN).
It reads files (a model's config.json, the first row of each data file) but never builds a model or loads a
tokenizer; torch is imported only to count GPUs, and only when the config asks for them.

A value that already failed a rule (unset, unresolvable, wrong type, out of range) is left out of the later
rules, so each mistake is reported once.
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spinlm import choices
from spinlm.config import available_presets, default_config, flatten, load_config, world_size
from spinlm.errors import ConfigError
from spinlm.extras import missing_extra
from spinlm.hub import hub_problem
from spinlm.run_dir import RunDir
from spinlm.tracking import missing_logger_libraries

logger = logging.getLogger(__name__)

MISSING = "???"

ENUMS: dict[str, tuple[str, ...]] = {
    "algorithm.mode": choices.ALGORITHM_MODES,
    "algorithm.reference": choices.REFERENCE_MODES,
    "algorithm.loss_type": choices.LOSS_TYPES,
    "data.format": choices.DATA_FORMAT_CHOICES,
    "data.truncation": choices.TRUNCATION_MODES,
    "actor.optimizer": choices.OPTIMIZERS,
    "actor.lr_scheduler": choices.LR_SCHEDULERS,
    "trainer.resume": choices.RESUME_MODES,
    "trainer.device": choices.DEVICES,
    "trainer.launcher": choices.LAUNCHERS,
    "model.dtype": choices.DTYPE_NAMES,
    "model.attn_implementation": choices.ATTN_IMPLEMENTATIONS,
    "rollout.engine": choices.ROLLOUT_ENGINES,
    "reward.gsm8k_method": choices.GSM8K_METHODS,
}
LOGGERS = choices.LOGGERS

# Types a key accepts where its default's type is not the whole story: mandatory (???) keys, null defaults and
# keys that take a number or a list. Any other key takes the type of its default.
TYPE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "model.path": ("str",),
    "model.tokenizer_path": ("null", "str"),
    "preset": ("null", "str"),
    "data.train_files": ("str", "list[str]"),
    "data.val_files": ("null", "str", "list[str]"),
    "data.prompts_per_round": ("null", "int"),
    "data.val_max_samples": ("null", "int"),
    "algorithm.beta": ("float", "list[float]"),
    "algorithm.length_normalize": ("null", "bool"),
    "reward.custom_path": ("null", "str"),
    "reward.timeout_s": ("null", "float"),
    "reward.model_path": ("null", "str"),
    "ray.address": ("null", "str"),
    "actor.max_tokens_per_micro_batch": ("null", "int"),
    "trainer.keep_last_checkpoints": ("null", "int"),
    "trainer.val_pass_k": ("null", "int"),
    "model.lora.target_modules": ("str", "list[str]"),
    "trainer.threads": ("null", "int"),
    "sft.max_examples": ("null", "int"),
    "sft.output_dir": ("null", "str"),
    "eval.pass_k": ("null", "list[int]"),
    "eval.temperature": ("null", "float"),
    "eval.top_p": ("null", "float"),
    "eval.lm_eval_tasks": ("list[str]",),
    "eval.lm_eval_include_path": ("null", "str"),
    "eval.lm_eval_limit": ("null", "int"),
    "eval.lm_eval_num_fewshot": ("null", "int"),
}
_TYPE_WORDS = {
    "null": "null", "bool": "a boolean (true/false)", "int": "an integer", "float": "a number", "str": "a string",
    "list[str]": "a list of strings", "list[float]": "a list of numbers", "list[int]": "a list of integers", "list": "a list",
    "any": "a scalar or a list",
}


# ------------------------------------------------------------------------------------------------ formatting

def _fmt(value: Any) -> str:
    """A value as the user would type it in an override (null, true, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):  # as YAML spells them
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _non_finite(value: Any) -> bool:
    """NaN or an infinity, alone or in a list: YAML's .nan / .inf parse as floats, and every range rule
    compares false with NaN, so they are refused before any rule sees them."""
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


def _matches(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return _is_number(value)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "list[float]":
        return isinstance(value, list) and all(_is_number(v) for v in value)
    if kind == "list[int]":
        return isinstance(value, list) and all(_matches(v, "int") for v in value)
    if kind == "list":
        return isinstance(value, list)
    return not isinstance(value, dict)  # "any": a leaf must not be a mapping


def _kinds_of_default(key: str, default: Any) -> tuple[str, ...]:
    if key in TYPE_OVERRIDES:
        return TYPE_OVERRIDES[key]
    if default is None:
        return ("null", "any")
    if isinstance(default, bool):
        return ("bool",)
    if isinstance(default, int):
        return ("int",)
    if isinstance(default, float):
        return ("float",)
    if isinstance(default, list):
        if default and all(isinstance(v, str) for v in default):
            return ("list[str]",)
        if default and all(_is_number(v) for v in default):
            return ("list[float]",)
        return ("list",)
    if default == MISSING:
        return ("any",)
    return ("str",)


# ------------------------------------------------------------------------------------------------ the tree

def _suggest(path: str, defaults: dict, all_leaves: list[str]) -> str | None:
    """The known key the user most likely meant: fix each path component against the defaults (typos), else the
    same leaf name in another section (actor.rounds -> trainer.rounds), else the closest full path."""
    parts, node, fixed = path.split("."), defaults, []
    for part in parts:
        if not isinstance(node, dict):
            break
        if part not in node:
            close = difflib.get_close_matches(part, [str(k) for k in node], n=1, cutoff=0.6)
            if not close:
                break
            part = close[0]
        fixed.append(part)
        node = node[part]
    else:
        guess = ".".join(fixed)
        if guess != path:
            return guess
    leaf = parts[-1]
    same_name = [k for k in all_leaves if k.rsplit(".", 1)[-1] == leaf]
    if same_name:
        return same_name[0]
    close = difflib.get_close_matches(path, all_leaves, n=1, cutoff=0.6)
    return close[0] if close else None


def _resolve(cfg: DictConfig, path: str) -> Any:
    """The value at ``path`` with interpolations resolved, as plain Python; raises omegaconf's errors."""
    value = OmegaConf.select(cfg, path, throw_on_resolution_failure=True, throw_on_missing=True)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True, throw_on_missing=True)
    return value


def _read_tree(cfg: DictConfig) -> tuple[list[str], dict[str, Any]]:
    """Unknown keys, missing and unresolvable values, and types. Returns the problems and the values that
    passed, by dotted key."""
    defaults = OmegaConf.to_container(default_config(), resolve=False)
    default_leaves = flatten(defaults)
    raw = OmegaConf.to_container(cfg, resolve=False)
    problems: list[str] = []
    values: dict[str, Any] = {}

    def walk(user: dict, known: dict, prefix: str) -> None:
        for key, value in user.items():
            path = f"{prefix}{key}"
            if key not in known:
                leaves = flatten(value, path + ".") if isinstance(value, dict) and value else {path: value}
                for leaf, leaf_value in leaves.items():
                    guess = _suggest(leaf, defaults, list(default_leaves))
                    hint = f"; did you mean {guess}?" if guess else ""
                    problems.append(f"{leaf}={_fmt(leaf_value)}: unknown key{hint}")
                continue
            if isinstance(known[key], dict):
                if isinstance(value, dict):
                    walk(value, known[key], path + ".")
                else:
                    problems.append(f"{path}={_fmt(value)}: expected a section with keys "
                                    f"{', '.join(known[key])}")
        for key in known:
            if key not in user and not isinstance(known[key], dict):
                problems.append(f"{prefix}{key}: missing from the config (the packaged default is "
                                f"{_fmt(known[key])})")

    walk(raw, defaults, "")

    for key, default in default_leaves.items():
        if not _present(raw, key):
            continue  # absent: reported by walk
        raw_value = _get(raw, key)
        if raw_value == MISSING:
            problems.append(f"{key}=???: must be set (a mandatory value with no default)")
            continue
        try:
            value = _resolve(cfg, key)
        except OmegaConfBaseException as exc:
            problems.append(f"{key}={_fmt(raw_value)}: cannot resolve ({_resolution_reason(exc)})")
            continue
        kinds = _kinds_of_default(key, default)
        if not any(_matches(value, k) for k in kinds):
            expected = " or ".join(_TYPE_WORDS[k] for k in kinds)
            shown = f" (the default is {_fmt(default)})" if default not in (None, MISSING) else ""
            problems.append(f"{key}={_fmt(value)}: expected {expected}{shown}")
            continue
        if _non_finite(value):
            problems.append(f"{key}={_fmt(value)}: must be a finite number (NaN and infinities are not allowed)")
            continue
        values[key] = value
    return problems, values


_WRAPPED = re.compile(r"^\w+ raised while resolving interpolation: (.*)$")


def _resolution_reason(exc: OmegaConfBaseException) -> str:
    """omegaconf prefixes a resolver's own error with its Python type ('KeyError raised while resolving
    interpolation: "Environment variable 'X' not found"'): keep the resolver's words."""
    reason = str(exc).splitlines()[0]
    wrapped = _WRAPPED.match(reason)
    return wrapped.group(1).strip('"') if wrapped else reason


def _present(raw: dict, key: str) -> bool:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _get(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        node = node[part]
    return node


class _Values:
    """The values that passed every rule so far; a rule that finds one bad drops it for the rules after."""

    def __init__(self, values: dict[str, Any]):
        self._values = values

    def has(self, *keys: str) -> bool:
        return all(k in self._values for k in keys)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def drop(self, key: str) -> None:
        self._values.pop(key, None)

    def section(self, prefix: str) -> dict[str, Any]:
        return {k[len(prefix) + 1:]: v for k, v in self._values.items() if k.startswith(prefix + ".")}


# ------------------------------------------------------------------------------------------------ rules

def _check_enums(v: _Values) -> list[str]:
    problems = []
    choices_of = dict(ENUMS, preset=tuple(available_presets()))
    if v.has("preset") and v["preset"] is None:  # no preset: the packaged defaults
        v.drop("preset")
    for key, allowed in choices_of.items():
        if v.has(key) and v[key] not in allowed:
            close = difflib.get_close_matches(str(v[key]), allowed, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            problems.append(f"{key}={_fmt(v[key])}: must be one of {', '.join(allowed)}{hint}")
            v.drop(key)
    return problems


def _check_loggers(v: _Values) -> list[str]:
    problems = []
    if v.has("trainer.logger"):
        for i, name in enumerate(v["trainer.logger"]):
            if name not in LOGGERS:
                close = difflib.get_close_matches(name, LOGGERS, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                problems.append(f"trainer.logger[{i}]={_fmt(name)}: must be one of {', '.join(LOGGERS)}{hint}")
        problems += missing_logger_libraries([n for n in v["trainer.logger"] if n in LOGGERS])
    return problems


# key -> (lower bound, lower inclusive, upper bound, upper inclusive, null allowed)
_Bound = tuple[float | None, bool, float | None, bool, bool]
RANGES: dict[str, _Bound] = {
    "data.max_prompt_length": (1, True, None, False, False),
    "data.max_response_length": (1, True, None, False, False),
    "data.prompts_per_round": (1, True, None, False, True),
    "data.val_max_samples": (1, True, None, False, True),
    "algorithm.label_smoothing": (0, True, 0.5, False, False),
    "algorithm.dpop_lambda": (0, True, None, False, False),
    "algorithm.sft_weight": (0, True, None, False, False),
    "algorithm.history_rounds": (0, True, None, False, False),
    "algorithm.ref_update_every": (1, True, None, False, False),
    "algorithm.missing_eos_penalty": (0, True, None, False, False),
    "algorithm.min_reward_margin": (0, True, None, False, False),
    "rollout.n": (1, True, None, False, False),
    "rollout.temperature": (0, False, None, False, False),
    "rollout.top_p": (0, False, 1, True, False),
    "rollout.top_k": (0, True, None, False, False),
    "rollout.batch_size": (1, True, None, False, False),
    "rollout.gpu_memory_utilization": (0, False, 1, True, False),
    "reward.timeout_s": (0, False, None, False, True),
    "actor.lr": (0, False, None, False, False),
    "actor.weight_decay": (0, True, None, False, False),
    "actor.eps": (0, False, None, False, False),
    "actor.warmup_ratio": (0, True, 1, False, False),
    "actor.grad_clip": (0, False, None, False, False),
    "actor.micro_batch_size": (1, True, None, False, False),
    "actor.max_tokens_per_micro_batch": (1, True, None, False, True),
    "actor.logprob_chunk_size": (1, True, None, False, True),
    "trainer.rounds": (1, True, None, False, False),
    "trainer.epochs_per_round": (1, True, None, False, False),
    "trainer.train_batch_size": (1, True, None, False, False),
    "trainer.n_gpus_per_node": (0, True, None, False, False),
    "trainer.nnodes": (1, True, None, False, False),
    "trainer.cpu_workers": (1, True, None, False, False),
    "trainer.log_every": (1, True, None, False, False),
    "trainer.log_samples": (0, True, None, False, False),
    "trainer.keep_last_checkpoints": (1, True, None, False, True),
    "trainer.val_pass_k": (1, True, None, False, True),
    "model.lora.rank": (0, True, None, False, False),
    "model.lora.alpha": (0, False, None, False, False),
    "model.lora.dropout": (0, True, 1, False, False),
    "trainer.max_bad_steps": (0, True, None, False, False),
    "trainer.collapse_threshold": (0, False, None, False, False),
    "trainer.threads": (1, True, None, False, True),
    "sft.steps": (1, True, None, False, False),
    "sft.batch_size": (1, True, None, False, False),
    "sft.lr": (0, False, None, False, False),
    "sft.warmup_ratio": (0, True, 1, False, False),
    "sft.max_examples": (1, True, None, False, True),
    "reward.model_batch_size": (1, True, None, False, False),
    "reward.format_score": (0, True, 1, False, False),
    "reward.model_max_length": (1, True, None, False, False),
    "eval.n": (0, True, None, False, False),
    "eval.temperature": (0, False, None, False, True),
    "eval.top_p": (0, False, 1, True, True),
    "eval.lm_eval_limit": (1, True, None, False, True),
    "eval.lm_eval_num_fewshot": (0, True, None, False, True),
}


def _in_range(x: float, lo: float | None, lo_inc: bool, hi: float | None, hi_inc: bool) -> bool:
    if lo is not None and (x < lo if lo_inc else x <= lo):
        return False
    return hi is None or (x <= hi if hi_inc else x < hi)


def _describe_range(lo: float | None, lo_inc: bool, hi: float | None, hi_inc: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'[' if lo_inc else '('}{_num(lo)}, {_num(hi)}{']' if hi_inc else ')'}"
    if lo is not None:
        return f"{'>=' if lo_inc else '>'} {_num(lo)}"
    return f"{'<=' if hi_inc else '<'} {_num(hi)}"


def _check_ranges(v: _Values) -> list[str]:
    problems = []
    for key, (lo, lo_inc, hi, hi_inc, nullable) in RANGES.items():
        if not v.has(key) or (nullable and v[key] is None):
            continue
        if not _in_range(v[key], lo, lo_inc, hi, hi_inc):
            rule = _describe_range(lo, lo_inc, hi, hi_inc)
            problems.append(f"{key}={_fmt(v[key])}: must be {'null or ' if nullable else ''}{rule}")
            v.drop(key)
    if v.has("actor.betas"):
        betas = v["actor.betas"]
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            problems.append(f"actor.betas={_fmt(betas)}: must be two numbers in [0, 1) (Adam's beta1, beta2)")
    return problems


def _check_beta(v: _Values) -> list[str]:
    if not v.has("algorithm.beta"):
        return []
    beta = v["algorithm.beta"]
    rule = "must be > 0 (a number, or a list with one positive value per round)"
    if not isinstance(beta, list):
        return [] if beta > 0 else [f"algorithm.beta={_fmt(beta)}: {rule}"]
    problems = [f"algorithm.beta={_fmt(beta)}: algorithm.beta[{i}]={_fmt(b)} {rule}"
                for i, b in enumerate(beta) if b <= 0]
    if v.has("trainer.rounds") and len(beta) != v["trainer.rounds"]:
        problems.append(f"algorithm.beta={_fmt(beta)}: a list needs one value per round: {len(beta)} value(s) "
                        f"for trainer.rounds={v['trainer.rounds']}")
    return problems


def _check_mode(v: _Values) -> list[str]:
    problems = []
    if v.has("algorithm.mode", "rollout.n") and v["algorithm.mode"] == "online_dpo" and v["rollout.n"] < 2:
        problems.append(f"rollout.n={v['rollout.n']}: algorithm.mode=online_dpo needs rollout.n >= 2 (each pair is "
                        "the best vs the worst of n samples of the same prompt)")
    if v.has("algorithm.loss_type", "algorithm.sft_weight") and v["algorithm.loss_type"] == "sft" and v["algorithm.sft_weight"] <= 0:
        problems.append(f"algorithm.sft_weight={v['algorithm.sft_weight']}: algorithm.loss_type=sft trains only the "
                        "SFT term, so it needs algorithm.sft_weight > 0")
    if v.has("algorithm.sft_on_correct_only", "algorithm.sft_weight") and v["algorithm.sft_on_correct_only"] \
            and v["algorithm.sft_weight"] == 0:
        problems.append("algorithm.sft_on_correct_only=true: selects which chosen responses the SFT term trains on, "
                        "but algorithm.sft_weight=0 turns that term off; set algorithm.sft_weight > 0")
    if v.has("algorithm.reference", "model.lora.rank") and v["algorithm.reference"] == "initial" \
            and v["model.lora.rank"] > 0:
        problems.append(f"algorithm.reference=initial: not supported with LoRA (model.lora.rank="
                        f"{v['model.lora.rank']}), whose reference is the base model that each round's merge "
                        "updates; use algorithm.reference=refresh, or full fine-tuning (model.lora.rank=0)")
    return problems


def _check_batches(v: _Values) -> list[str]:
    keys = ("trainer.train_batch_size", "actor.micro_batch_size", "trainer.nnodes", "trainer.n_gpus_per_node",
            "trainer.cpu_workers")
    if not v.has(*keys):
        return []
    batch, micro, nnodes, gpus, cpus = (v[k] for k in keys)
    world = world_size(nnodes, gpus, cpus)
    if batch % (micro * world) == 0:
        return []
    if gpus > 0:
        how = f"trainer.nnodes x trainer.n_gpus_per_node = {nnodes} x {gpus}"
    else:
        how = f"trainer.nnodes x trainer.cpu_workers = {nnodes} x {cpus}" if nnodes > 1 else f"trainer.cpu_workers = {cpus}"
    return [f"trainer.train_batch_size={batch}: must be divisible by actor.micro_batch_size x world size = "
            f"{micro} x {world} = {micro * world} (world size = {how})"]


def _check_lora(v: _Values) -> list[str]:
    if not v.has("model.lora.rank") or v["model.lora.rank"] == 0:
        return []
    problems = []
    if hint := missing_extra("lora"):
        problems.append(f"model.lora.rank={v['model.lora.rank']}: LoRA needs peft ({hint})")
    if v.has("trainer.nnodes", "trainer.n_gpus_per_node", "trainer.cpu_workers"):
        world = world_size(v["trainer.nnodes"], v["trainer.n_gpus_per_node"], v["trainer.cpu_workers"])
        if world > 1:
            problems.append(f"model.lora.rank={v['model.lora.rank']}: LoRA runs on one rank for now (world size "
                            f"{world}); use full fine-tuning with FSDP2 across ranks")
    if v.has("rollout.engine") and v["rollout.engine"] == "vllm":
        problems.append(f"model.lora.rank={v['model.lora.rank']}: LoRA works with rollout.engine=hf only for now "
                        "(the vllm engine is sent plain weights, not an adapter)")
    return problems


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _looks_local(path: str) -> bool:
    """A local path rather than a hub id such as 'Qwen/Qwen2.5-0.5B' (which is not checked offline)."""
    return path.startswith((".", "/", "~")) or (os.sep in path and not _HUB_ID.fullmatch(path))


def _read_model_config(key: str, path: str) -> tuple[list[str], dict | None]:
    """Problems with a model directory, and its config.json when there is one to read."""
    if not path.strip():
        return [f"{key}={_fmt(path)}: must not be empty (a model directory or hub id)"], None
    local = Path(path).expanduser()
    if not local.exists():
        if _looks_local(path):
            return [f"{key}={path}: no such directory"], None
        return [p for p in [hub_problem(key, path)] if p], None  # a hub id: it must be cached or reachable
    if not local.is_dir():
        return [f"{key}={path}: is a file; expected a Hugging Face model directory (with config.json)"], None
    config_json = local / "config.json"
    if not config_json.is_file():
        return [f"{key}={path}: the directory has no config.json, so it is not a Hugging Face model directory"], None
    try:
        data = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{key}={path}: cannot read {config_json} ({exc})"], None
    if not isinstance(data, dict):
        return [f"{key}={path}: {config_json} holds {type(data).__name__}, expected a JSON object"], None
    return [], data


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def _max_positions(model_config: dict) -> tuple[str, int] | None:
    for section in (model_config, model_config.get("text_config")):
        if isinstance(section, dict):
            for name in _POSITION_KEYS:
                if _is_number(section.get(name)):
                    return name, int(section[name])
    return None


def _check_model(v: _Values) -> list[str]:
    return _model_problems(v, check_context=True)


def _check_sft_model(v: _Values) -> list[str]:
    # no context rule: SFT generates nothing, so its sequences are the rows' own lengths (data.max_*_length only cap
    # them), and the bundled task fine-tunes its 256-position model under the default 512-token caps
    return _model_problems(v, check_context=False)


def _model_problems(v: _Values, *, check_context: bool) -> list[str]:
    """The model and tokenizer folders; with check_context, prompt + response (the generation budget) must fit the
    model's positions."""
    problems: list[str] = []
    model_config = None
    if v.has("model.path"):
        found, model_config = _read_model_config("model.path", v["model.path"])
        problems += found
    if v.has("model.tokenizer_path") and v["model.tokenizer_path"] is not None:
        path = v["model.tokenizer_path"]
        if not Path(path).expanduser().exists() and (_looks_local(path) or not path.strip()):
            problems.append(f"model.tokenizer_path={_fmt(path)}: no such directory")
        elif not Path(path).expanduser().exists() and (problem := hub_problem("model.tokenizer_path", path)):
            problems.append(problem)
    if not check_context or model_config is None or not v.has("data.max_prompt_length", "data.max_response_length"):
        return problems
    limit = _max_positions(model_config)
    prompt, response = v["data.max_prompt_length"], v["data.max_response_length"]
    if limit is not None and prompt + response > limit[1]:
        problems.append(f"data.max_prompt_length + data.max_response_length = {prompt} + {response} = "
                        f"{prompt + response}: must be <= the model's {limit[0]}={limit[1]} "
                        f"(from {v['model.path']}/config.json)")
    return problems


def _check_attention(v: _Values) -> list[str]:
    problems = []
    if v.has("model.attn_implementation", "trainer.device") and v["trainer.device"] == "cpu" \
            and v["model.attn_implementation"] == "flash_attention_2":
        problems.append("model.attn_implementation=flash_attention_2: needs a CUDA GPU, but trainer.device=cpu "
                        "(use sdpa or eager)")
    elif v.has("model.attn_implementation") and v["model.attn_implementation"] == "flash_attention_2" \
            and importlib.util.find_spec("flash_attn") is None:
        problems.append("model.attn_implementation=flash_attention_2: the flash-attn package is not installed "
                        "(pip install flash-attn, or use auto / sdpa)")
    return problems


def _check_rollout_engine(v: _Values) -> list[str]:
    if v.has("rollout.engine") and v["rollout.engine"] == "vllm" and (hint := missing_extra("vllm")):
        return [f"rollout.engine=vllm: the vllm package is not installed ({hint} on a CUDA machine; on CPU see "
                "scripts/setup_vllm_env.sh), or use rollout.engine=hf"]
    return []


def _check_data_files(v: _Values) -> list[str]:
    if not v.has("algorithm.mode"):
        return []
    # Only training needs the ground-truth response (spin: chosen = ground truth); validation scores the
    # policy's own samples with the reward, so a val file without responses is fine.
    return _data_file_problems(v, train_needs_response=v["algorithm.mode"] == "spin")


def _check_sft_data_files(v: _Values) -> list[str]:
    # SFT needs a response in every training row; a row without one is named when the rows are read (the first
    # row alone does not say)
    return _data_file_problems(v, train_needs_response=False)


def _data_file_problems(v: _Values, *, train_needs_response: bool) -> list[str]:
    from spinlm.data.formats import check_file

    if not v.has("data.format"):
        return []
    problems = []
    for key, need_response in (("data.train_files", train_needs_response), ("data.val_files", False)):
        if not v.has(key) or v[key] is None:
            continue
        value = v[key]
        paths = [(key, value)] if isinstance(value, str) else [(f"{key}[{i}]", p) for i, p in enumerate(value)]
        if not paths and key == "data.train_files":
            problems.append(f"{key}=[]: must name at least one file")
        for label, path in paths:
            for msg in check_file(os.path.expanduser(path), fmt=v["data.format"], need_response=need_response):
                problems.append(f"{label}: {msg}")
    return problems


def _writable_problem(key: str, path: str) -> str | None:
    """The directory can be created and written by this user; nothing is created to find out."""
    target = Path(path).expanduser().absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    where = "it" if probe == target else f"its nearest existing parent {probe}"
    if not probe.is_dir():
        return f"{key}={path}: cannot be a directory: {where} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{key}={path}: not writable: this user cannot write to {where}"
    return None


def _check_output_dirs(v: _Values) -> list[str]:
    problems = []
    for key in ("trainer.output_dir", "sft.output_dir"):
        if v.has(key) and v[key] is not None:
            if not v[key].strip():
                problems.append(f"{key}={_fmt(v[key])}: must not be empty")
                continue
            found = _writable_problem(key, v[key])
            if found:
                problems.append(found)
    if v.has("trainer.output_dir") and v["trainer.output_dir"] and v["trainer.output_dir"].strip():
        run = RunDir(Path(v["trainer.output_dir"]).expanduser())
        for folder in (run.checkpoints, run.rounds):  # folders a run writes its results into
            if folder.exists() and not folder.is_dir():
                problems.append(f"trainer.output_dir={_fmt(v['trainer.output_dir'])}: {folder} is a file where the run "
                                "keeps a folder; move it away or pick another trainer.output_dir")
    return problems


def _check_reward_model(v: _Values) -> list[str]:
    """The reward model, and the weights that mix it with the rule reward (training and evaluation)."""
    if v.has("reward.model_path") and v["reward.model_path"] is not None:
        return _read_model_config("reward.model_path", v["reward.model_path"])[0]
    if v.has("reward.weights.rule") and v["reward.weights.rule"] == 0:
        return ["reward.weights.rule=0: with no reward.model_path there would be no reward at all "
                "(set reward.model_path, or a non-zero rule weight)"]
    return []


def _check_reward_function(v: _Values) -> list[str]:
    """The rule reward: the built-in one's settings, or the user's reward.custom_path function."""
    problems = []
    if v.has("reward.format_score", "reward.custom_path") and v["reward.format_score"] and v["reward.custom_path"]:
        problems.append(f"reward.format_score={v['reward.format_score']}: applies to the built-in GSM8K reward only, "
                        f"not to reward.custom_path={v['reward.custom_path']!r} (score the format in your function)")
    if not v.has("reward.custom_path", "reward.custom_name") or v["reward.custom_path"] is None:
        return problems
    from spinlm.rewards import check_reward

    return problems + list(check_reward(v.section("reward")))


def _check_eval(v: _Values) -> list[str]:
    problems = []
    if v.has("eval.pass_k", "eval.n") and v["eval.pass_k"] is not None:
        n, ks = v["eval.n"], v["eval.pass_k"]
        if n == 0:
            problems.append(f"eval.pass_k={_fmt(ks)}: pass@k needs samples; set eval.n (samples per prompt) >= max(k)")
        else:
            problems += [f"eval.pass_k={_fmt(ks)}: eval.pass_k[{i}]={k} must be in [1, eval.n={n}] (the unbiased "
                         f"estimator needs at least k samples)" for i, k in enumerate(ks) if not 1 <= k <= n]
    if v.has("eval.lm_eval_include_path") and v["eval.lm_eval_include_path"] is not None:
        path = v["eval.lm_eval_include_path"]
        if not Path(path).expanduser().is_dir():
            problems.append(f"eval.lm_eval_include_path={_fmt(path)}: no such directory (a folder of lm-eval task YAMLs)")
    if v.has("eval.lm_eval_tasks") and v["eval.lm_eval_tasks"] and (hint := missing_extra("eval")):
        # now, not after the model has loaded and the greedy eval has run
        problems.append(f"eval.lm_eval_tasks={_fmt(v['eval.lm_eval_tasks'])}: needs lm-evaluation-harness, which is "
                        f"not installed; install it with: {hint}")
    return problems


def _visible_gpus() -> int:
    import torch  # only here: counting GPUs is the one thing config checking needs torch for

    return torch.cuda.device_count()


NO_CUDA_GPU = "trainer.device=cuda: no CUDA GPU is visible on this machine (torch.cuda.device_count()=0)"


def _check_gpus(v: _Values) -> list[str]:
    if not v.has("trainer.device", "trainer.n_gpus_per_node", "trainer.nnodes"):
        return []
    device, gpus, nnodes = v["trainer.device"], v["trainer.n_gpus_per_node"], v["trainer.nnodes"]
    if device == "cpu":
        return [f"trainer.n_gpus_per_node={gpus}: trainer.device=cpu uses no GPU (set n_gpus_per_node=0, "
                "or device=cuda)"] if gpus > 0 else []
    if (device != "cuda" and gpus == 0) or nnodes > 1:
        return []  # with several nodes the GPUs are on the cluster's nodes, not necessarily on this one
    visible = _visible_gpus()
    if visible == 0 and device == "cuda":
        return [NO_CUDA_GPU]
    if gpus > visible:
        return [f"trainer.n_gpus_per_node={gpus}: this machine has only {visible} visible GPU(s) "
                "(torch.cuda.device_count(); see CUDA_VISIBLE_DEVICES)"]
    return []


def _check_sft_device(v: _Values) -> list[str]:
    """`spinlm sft` runs on one device (trainer.device), whatever the rank counts of a training config say."""
    if v.has("trainer.device") and v["trainer.device"] == "cuda" and _visible_gpus() == 0:
        return [NO_CUDA_GPU]
    return []


def _check_sft_reward(v: _Values) -> list[str]:
    """SFT scores only its validation answers, with the rule reward (the reward model is not used)."""
    if not v.has("data.val_files") or v["data.val_files"] is None:
        return []
    return _check_reward_function(v)


Rule = Callable[[_Values], list[str]]
RULES: tuple[Rule, ...] = (
    _check_enums, _check_loggers, _check_ranges, _check_beta, _check_mode, _check_batches, _check_lora, _check_model,
    _check_attention, _check_rollout_engine, _check_data_files, _check_output_dirs, _check_reward_model,
    _check_reward_function, _check_gpus, _check_eval,
)
# `spinlm evaluate` trains nothing: no schedule, batch, mode or output rules, and the train files may be unset
EVAL_RULES: tuple[Rule, ...] = (
    _check_enums, _check_loggers, _check_ranges, _check_model, _check_attention, _check_data_files,
    _check_reward_model, _check_reward_function, _check_eval,
)
# `spinlm sft` trains one model on one device with a response-only loss: the sft.* keys (in the ranges), the model,
# the data files, where it writes, and the reward of its validation; nothing about rounds, ranks, pairs, loggers or
# the generation budget
SFT_RULES: tuple[Rule, ...] = (
    _check_enums, _check_ranges, _check_sft_model, _check_attention, _check_sft_data_files, _check_output_dirs,
    _check_sft_reward, _check_sft_device,
)


def _apply(cfg: DictConfig, rules: tuple[Rule, ...]) -> list[str]:
    """The shared type, NaN and unknown-key checks of the tree, then each rule in turn."""
    problems, values = _read_tree(cfg)
    v = _Values(values)
    for rule in rules:
        problems += rule(v)
    return problems


def check_config(cfg: DictConfig) -> list[str]:
    """Every problem with ``cfg``, each a line naming the key, its value and the rule; [] when the run may start."""
    return _apply(cfg, RULES)


def check_eval_config(cfg: DictConfig) -> list[str]:
    """The problems that matter to `spinlm evaluate`: what loads the model, the val files and the reward."""
    problems, values = _read_tree(cfg)
    problems = [p for p in problems if not p.startswith("data.train_files=")]
    values.pop("data.train_files", None)
    if "data.val_files" in values and values["data.val_files"] is None:
        problems.append("data.val_files=null: spinlm evaluate needs held-out prompts with a ground truth "
                        "(pass data.val_files=FILE)")
    v = _Values(values)
    for rule in EVAL_RULES:
        problems += rule(v)
    return problems


def check_sft_config(cfg: DictConfig) -> list[str]:
    """The problems that matter to `spinlm sft`: the shared type, NaN and unknown-key checks, then SFT_RULES."""
    return _apply(cfg, SFT_RULES)


def validate_sft(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem `spinlm sft` has with ``cfg``, or return quietly."""
    problems = check_sft_config(cfg)
    if problems:
        raise ConfigError(problems)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem, or return quietly (logging a warning for each ignored key)."""
    problems = check_config(cfg)
    if problems:
        raise ConfigError(problems)
    for warning in ignored_key_warnings(cfg):
        logger.warning("%s", warning)


# Keys that only one mode reads; the other mode ignores them.
MODE_ONLY_KEYS = {
    "spin": ("algorithm.history_rounds", "algorithm.drop_identical_pairs", "trainer.epochs_per_round",
             "data.prompts_per_round"),
    "online_dpo": ("rollout.n", "algorithm.ref_update_every", "algorithm.missing_eos_penalty", "actor.opponent_offload"),
}


def ignored_key_warnings(cfg: DictConfig) -> list[str]:
    """A key the chosen mode ignores, set away from its default (or its preset's value): a line saying so."""
    mode = OmegaConf.select(cfg, "algorithm.mode", default=None)
    if mode not in MODE_ONLY_KEYS:
        return []
    preset = OmegaConf.select(cfg, "preset", default=None)
    baseline = load_config([f"preset={preset}"] if preset else [])
    out = []
    for other, keys in MODE_ONLY_KEYS.items():
        if other == mode:
            continue
        for key in keys:
            value = OmegaConf.select(cfg, key, default=None)
            if value != OmegaConf.select(baseline, key, default=None):
                out.append(f"{key}={_fmt(value)} is ignored in algorithm.mode={mode} (only {other} reads it)")
    return out

