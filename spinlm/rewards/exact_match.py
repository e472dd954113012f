"""Exact match of the whole response against the ground truth, ignoring surrounding whitespace."""
from __future__ import annotations


def compute_score(data_source: str, solution_str: str, ground_truth: str | None,
                  extra_info: dict | None = None) -> float:
    if ground_truth is None:
        raise ValueError("exact_match reward needs a ground truth (reward_model.ground_truth), got none")
    return 1.0 if solution_str.strip() == str(ground_truth).strip() else 0.0
