"""Metrics out: metrics.jsonl (one JSON object per logged step / round) and a console summary line."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm

SUMMARY_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "train/lr")


class Tracker:
    def __init__(self, run_dir: Path, loggers, log_every: int = 10):
        unknown = set(loggers) - {"console", "jsonl"}
        if unknown:
            raise ValueError(f"trainer.logger: {sorted(unknown)} not available in this build (console, jsonl)")
        self.console = "console" in loggers
        self.jsonl = open(Path(run_dir) / "metrics.jsonl", "a") if "jsonl" in loggers else None
        self.log_every = log_every

    def log(self, metrics: dict, *, round: int, step: int, kind: str = "train") -> None:
        row = {"round": round, "step": step, "kind": kind,
               **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        if self.jsonl:
            self.jsonl.write(json.dumps(row, allow_nan=True) + "\n")
            self.jsonl.flush()
        if self.console and (kind != "train" or step % self.log_every == 0):
            keys = SUMMARY_KEYS if kind == "train" else sorted(metrics)
            parts = [f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics]
            tqdm.write(f"[round {round} {kind} step {step}] " + " ".join(parts))

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}")
    return str(v)
