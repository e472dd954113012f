"""Metrics out: metrics.jsonl (one JSON object per logged row), a console summary line, and optionally
TensorBoard, Weights & Biases and MLflow through their own libraries (imported only when asked for)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from tqdm.auto import tqdm

from spinlm.errors import UserError

SUMMARY_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "train/lr")
LIBRARIES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def missing_logger_libraries(loggers) -> list[str]:
    """Problems for the safety officer: a logger whose library is not installed."""
    return [f"trainer.logger contains {name}: its library is not installed (pip install {LIBRARIES[name]})"
            for name in loggers if name in LIBRARIES and importlib.util.find_spec(LIBRARIES[name]) is None]


class Tracker:
    def __init__(self, run_dir: Path, loggers, log_every: int = 10, *, experiment: str = "spinlm", config: dict | None = None):
        problems = missing_logger_libraries(loggers)
        if problems:
            raise UserError("; ".join(problems))
        run_dir = Path(run_dir)
        self.console = "console" in loggers
        self.log_every = log_every
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if "jsonl" in loggers else None
        self.tensorboard = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.wandb = None
        if "wandb" in loggers:  # WANDB_MODE=offline works with no network
            import wandb

            self.wandb = wandb.init(project=experiment, dir=str(run_dir), config=config, reinit=True)
        self.mlflow = None
        if "mlflow" in loggers:  # MLFLOW_TRACKING_URI unset: a local file store under the run directory
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
            mlflow.set_experiment(experiment)
            self.mlflow = mlflow
            mlflow.start_run()

    def log(self, metrics: dict, *, round: int, step: int, kind: str = "train") -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.jsonl:
            self.jsonl.write(json.dumps({"round": round, "step": step, "kind": kind, **numbers}, allow_nan=True) + "\n")
            self.jsonl.flush()
        if self.tensorboard:
            for k, v in numbers.items():
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log({**numbers, "round": round}, step=step)
        if self.mlflow:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in numbers.items() if math.isfinite(v)}, step=step)
        if self.console and (kind != "train" or step % self.log_every == 0):
            keys = SUMMARY_KEYS if kind == "train" else sorted(numbers)
            parts = [f"{k}={_fmt(numbers[k])}" for k in keys if k in numbers]
            tqdm.write(f"[round {round} {kind} step {step}] " + " ".join(parts))

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        if self.mlflow:
            self.mlflow.end_run()


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}")
    return str(v)
