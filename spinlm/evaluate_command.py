"""`spinlm evaluate PATH [overrides]`: greedy accuracy, pass@k and lm-evaluation-harness tasks of a checkpoint, or
of every round of a run.

PATH is a run directory (each complete checkpoints/<t> is evaluated, one row per round), a checkpoint inside one,
or any Hugging Face model folder. Inside a run the run's own config.yaml is the base (its val files, lengths and
reward), so the greedy accuracy is the trainer's val/acc; elsewhere the packaged defaults are, and data.val_files
must be given. What would run someone else's code (trust_remote_code, reward.custom_path) comes from the command
line only, never from the run's files.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from spinlm.config import default_config, load_config, load_run_config, resolved
from spinlm.errors import ConfigError, UserError
from spinlm.run_dir import CHECKPOINTS_DIR, STATE_FILE, RunDir, complete_checkpoints, run_dir_of_checkpoint

log = logging.getLogger(__name__)


def find_checkpoints(path: Path) -> tuple[Path | None, list[tuple[str, Path]]]:
    """(the run's config.yaml or None, [(round, model folder)]) for a run directory, a checkpoint or a model."""
    run = RunDir(path)
    if run.checkpoints.is_dir():
        done = complete_checkpoints(path)
        if not done:
            raise UserError(f"{path}: a run directory with no complete checkpoint in {run.checkpoints} "
                            f"(a checkpoint is complete once its {STATE_FILE} is written)")
        return (run.config if run.config.is_file() else None), [(p.name, p) for p in done]
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: neither a run directory (with {CHECKPOINTS_DIR}/) nor a Hugging Face model folder "
                        "(with config.json)")
    owner = run_dir_of_checkpoint(path)
    in_run = owner is not None and owner.config.is_file()
    return (owner.config if in_run else None), [(path.name, path)]


# What runs someone's code: taken from the command line only, never from a run directory's files (a run directory
# someone sent you would otherwise run their code with no flag typed).
TRUST_KEYS = ("model.trust_remote_code", "reward.model_trust_remote_code", "reward.custom_path", "reward.custom_name")


def _trust_from_command_line(cfg, run_config: Path, overrides: list[str]) -> None:
    """Reset TRUST_KEYS that the command line does not set to the packaged defaults; say which the run used."""
    typed = {o.split("=", 1)[0] for o in overrides}
    defaults = default_config()
    for key in TRUST_KEYS:
        if key in typed:
            continue
        default, used = OmegaConf.select(defaults, key), OmegaConf.select(cfg, key)
        if used != default and key != "reward.custom_name":
            log.warning("%s: the run used %s=%s; spinlm evaluate takes it from the command line only, so it is not "
                        "used here (pass %s=... to use it)", run_config, key, used, key)
        OmegaConf.update(cfg, key, default)


def eval_config(run_config: Path | None, overrides: list[str], model_path: Path):
    from spinlm.config_check import check_eval_config

    cfg = load_run_config(run_config, overrides) if run_config else load_config(overrides)
    if run_config:
        _trust_from_command_line(cfg, run_config, list(overrides))
    OmegaConf.update(cfg, "model.path", str(model_path))
    problems = check_eval_config(cfg)
    if problems:
        raise ConfigError(problems)
    cfg = resolved(cfg)
    if cfg.eval.n > 0 and cfg.eval.pass_k is None:
        cfg.eval.pass_k = sorted({1, cfg.eval.n})
    return cfg


def evaluate_model_dir(cfg, model_path: Path, val_items_for) -> dict[str, float]:
    """Every configured evaluation of one model folder. val_items_for(tokenizer) tokenises the val set."""
    import torch

    from spinlm.evaluate import evaluate_accuracy, evaluate_pass_at_k
    from spinlm.rewards import get_reward_fn
    from spinlm.modeling import (check_vocab_fits, forward_context, load_model, load_tokenizer, master_dtype,
                                 pick_device, tokenizer_source)

    has_tokenizer = (model_path / "tokenizer_config.json").is_file()
    if not has_tokenizer and cfg.model.tokenizer_path is None:
        raise UserError(f"{model_path}: holds no tokenizer (no tokenizer_config.json); pass model.tokenizer_path=DIR")
    tokenizer = load_tokenizer(tokenizer_source(cfg.model, model_path), cfg.model.trust_remote_code)
    device = pick_device(cfg.trainer.device)
    # as the trainer runs it: fp32 weights under autocast when model.dtype is bf16/fp16 (mixed precision), and the
    # same attention backends (on CUDA no cuDNN attention: a graph build per decode step)
    model = load_model(str(model_path), dtype=master_dtype(cfg.model.dtype), attn_implementation=cfg.model.attn_implementation,
                       device=device, trust_remote_code=cfg.model.trust_remote_code).eval()
    check_vocab_fits(tokenizer, model, str(model_path))
    items = val_items_for(tokenizer)
    reward_fn = get_reward_fn(cfg.reward)
    log.info("evaluating %s: %d prompts, greedy%s", model_path, len(items),
             f" and {cfg.eval.n} samples each" if cfg.eval.n > 0 else "")
    common = dict(max_new_tokens=cfg.data.max_response_length, batch_size=cfg.rollout.batch_size, progress=True)
    with torch.no_grad(), forward_context(cfg.model.dtype, device):
        metrics = {"val/prompts": float(len(items))}
        metrics.update(evaluate_accuracy(model, tokenizer, items, reward_fn, **common))
        if cfg.eval.n > 0:
            e, r = cfg.eval, cfg.rollout
            metrics.update(evaluate_pass_at_k(
                model, tokenizer, items, reward_fn, n=e.n, ks=list(e.pass_k), seed=e.seed, top_k=r.top_k,
                temperature=r.temperature if e.temperature is None else e.temperature,
                top_p=r.top_p if e.top_p is None else e.top_p, **common))
    if cfg.eval.lm_eval_tasks:
        from spinlm.lm_eval_tasks import run_lm_eval

        metrics.update(run_lm_eval(model, tokenizer, list(cfg.eval.lm_eval_tasks),
                                   include_path=cfg.eval.lm_eval_include_path, limit=cfg.eval.lm_eval_limit,
                                   num_fewshot=cfg.eval.lm_eval_num_fewshot, batch_size=cfg.rollout.batch_size))
    return metrics


def evaluate_path(path: str | Path, overrides: list[str] = ()) -> list[dict]:
    """One row per evaluated model: {"round": <checkpoint name>, "path": ..., metric: value, ...}."""
    import torch

    from spinlm.data.items import load_val_items

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run directory or model folder")
    run_config, targets = find_checkpoints(path)
    cfg = eval_config(run_config, list(overrides), targets[0][1])
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    cache: dict = {}

    def val_items_for(tokenizer):
        # every round of a run saves the same tokenizer: tokenise the val set once
        key = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else id(tokenizer)
        if key not in cache:
            cache[key] = load_val_items(cfg.data, tokenizer)
        return cache[key]

    rows = []
    for name, model_path in targets:
        rows.append({"round": name, "path": str(model_path), **evaluate_model_dir(cfg, model_path, val_items_for)})
    return rows


def format_table(rows: list[dict]) -> str:
    """Round, then overall metrics (per-data_source ones are in the JSON output), one line per model."""
    metric_cols = [k for k in rows[0] if k not in ("round", "path") and not _per_source(k)]
    cols = ["round", *metric_cols]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(c, "-")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    line = lambda parts: "  ".join(p.rjust(w) for p, w in zip(parts, widths))  # noqa: E731
    return "\n".join([line(cols), *map(line, cells)])


def _per_source(key: str) -> bool:
    # val/acc/<source> and val/pass@k/<source>: three parts; lm_eval/<task>/<metric> stays in the table
    return key.startswith("val/") and key.count("/") >= 2


def write_rows(rows: list[dict], output: str) -> None:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(rows, indent=1) + "\n")
