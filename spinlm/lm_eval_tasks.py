"""lm-evaluation-harness tasks on an in-memory model, through lm_eval's Python API (the optional `eval` extra).

The model and tokenizer spinlm already loaded are handed to lm_eval's HFLM wrapper, so the harness scores exactly
what training produced; custom tasks come from eval.lm_eval_include_path (a folder of task YAMLs, which may read
local json/jsonl/parquet files, so no network is needed).
"""
from __future__ import annotations

from spinlm.errors import UserError
from spinlm.extras import install_hint


def run_lm_eval(model, tokenizer, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = 16) -> dict[str, float]:
    """{"lm_eval/<task>/<metric>": value} for every numeric metric lm_eval reports (stderr columns left out)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError(f"eval.lm_eval_tasks={tasks}: needs lm-evaluation-harness, which is not installed "
                        f"({exc}); install it with: {install_hint('eval')}") from exc
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)  # lm_eval's own ~15k tasks: about 10 s to index
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in eval.lm_eval_include_path={include_path}" if include_path else ""
        raise UserError(f"eval.lm_eval_tasks: unknown task(s) {unknown}: not among lm_eval's tasks{where}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=_max_length(model))
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False)
    metrics: dict[str, float] = {}
    for task, values in results["results"].items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in name \
                    and name != "sample_len":  # sample_len counts documents; it is not a score
                metrics[f"lm_eval/{task}/{name.split(',')[0]}"] = float(value)  # "acc,none" -> "acc"
    return metrics


def _max_length(model) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if isinstance(value, int):
            return value
    return None
