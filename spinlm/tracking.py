"""Metrics out: metrics.jsonl (one JSON object per logged row), a console summary line, and optionally
TensorBoard, Weights & Biases and MLflow through their own libraries (imported only when asked for)."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from spinlm.config import flatten
from spinlm.errors import UserError
from spinlm.extras import EXTRA_OF_TRACKER, missing_extra
from spinlm.run_dir import RunDir

SUMMARY_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "train/lr")


def missing_logger_libraries(loggers) -> list[str]:
    """Config-check problems: a logger whose library is not installed."""
    return [f"trainer.logger contains {name}: its library is not installed ({hint})"
            for name in loggers if name in EXTRA_OF_TRACKER and (hint := missing_extra(name))]


class Tracker:
    def __init__(self, run_dir: Path, loggers, log_every: int = 10, *, experiment: str = "spinlm", config: dict | None = None):
        problems = missing_logger_libraries(loggers)
        if problems:
            raise UserError("; ".join(problems))
        run_dir = Path(run_dir)
        self.console = "console" in loggers
        self.log_every = log_every
        self.jsonl = self.tensorboard = self.wandb = self.mlflow = None
        try:
            if "jsonl" in loggers:
                self.jsonl = open(RunDir(run_dir).metrics, "a")
            if "tensorboard" in loggers:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            if "wandb" in loggers:
                self.wandb = _start_wandb(run_dir, experiment, config)
            if "mlflow" in loggers:
                self.mlflow = _MlflowRun(run_dir, experiment, config)
        except BaseException:
            self.close(failed=True)  # the loggers that did start are closed, not left open
            raise

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
            self.mlflow.log(numbers, step)
        if self.console and (kind != "train" or step % self.log_every == 0):
            keys = SUMMARY_KEYS if kind == "train" else sorted(numbers)
            parts = [f"{k}={_fmt(numbers[k])}" for k in keys if k in numbers]
            tqdm.write(f"[round {round} {kind} step {step}] " + " ".join(parts))

    def log_samples(self, rows: list[dict], *, round: int, step: int) -> None:
        """A few of the round's judged pairs (prompt, chosen, rejected, their scores), as TRL logs completions: a
        W&B table, TensorBoard text and an MLflow artifact. metrics.jsonl leaves them out: every pair of the round
        is in rounds/<t>/pairs.parquet, and the report shows examples from there."""
        if not rows:
            return
        columns = list(rows[0])
        if self.tensorboard:
            self.tensorboard.add_text("samples", samples_markdown(rows, columns), step)
        if self.wandb:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows]),
                            "round": round}, step=step)
        if self.mlflow:
            self.mlflow.client.log_text(self.mlflow.run_id, samples_markdown(rows, columns),
                                        f"samples/round_{round}.md")

    def close(self, *, failed: bool = False) -> None:
        """failed: the run stopped on an error; W&B and MLflow mark their runs failed instead of finished."""
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish(exit_code=1 if failed else 0)
        if self.mlflow:
            self.mlflow.close(failed)


def _start_wandb(run_dir: Path, experiment: str, config: dict | None):
    import wandb

    try:  # create_new: a run of our own, leaving alone any run a notebook already has open
        return wandb.init(project=experiment, name=run_dir.name, dir=str(run_dir), config=config, reinit="create_new")
    except wandb.errors.UsageError as exc:  # typically no API key: say how to log without an account or network
        raise UserError(f"trainer.logger contains wandb: {exc} Log in with `wandb login`, or set WANDB_MODE=offline "
                        f"to write the run to {run_dir / 'wandb'} (upload it later with `wandb sync`)") from exc


class _MlflowRun:
    """One MLflow run through MlflowClient, so no global MLflow state (a notebook's active run, its tracking URI)
    is touched. MLFLOW_TRACKING_URI unset: a local file store in <run_dir>/mlruns, which needs no server."""

    def __init__(self, run_dir: Path, experiment: str, config: dict | None):
        from mlflow import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 serves its file store only opted in
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        if config:
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, numbers: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow's file store keeps a metric as a file at its slash path, so "val/acc" and "val/acc/tiny_arith"
        # cannot both exist: MLflow names use dots ("rewards.margins"). It rejects NaN / inf; metrics.jsonl has them
        metrics = [Metric(mlflow_name(k), v, now, step) for k, v in numbers.items() if math.isfinite(v)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def samples_markdown(rows: list[dict], columns: list[str]) -> str:
    """A markdown table; cells on one line, pipes escaped, so each pair stays one row."""
    cell = lambda v: "-" if v is None else str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def mlflow_name(key: str) -> str:
    return key.replace("/", ".")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}")
    return str(v)
