"""MATH-style answer match: the last \\boxed{...} of a solution against the ground truth, lightly normalised."""
from __future__ import annotations

import re

_BOXED = "\\boxed{"
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")  # not \rightarrow
_SPACE = re.compile(r"\s+")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None if there is none or it never closes."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 0
    begin = start + len(_BOXED)
    for i in range(begin, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def normalize(answer: str) -> str:
    out = _LEFT_RIGHT.sub("", answer)
    out = out.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    out = _SPACE.sub("", out)
    return out.rstrip(".")


def compute_score(data_source: str, solution_str: str, ground_truth: str | None,
                  extra_info: dict | None = None) -> float:
    if ground_truth is None:
        raise ValueError("math reward needs a ground truth (reward_model.ground_truth), got none")
    answer = last_boxed(solution_str)
    if answer is None:
        return 0.0
    truth = str(ground_truth)
    truth = last_boxed(truth) if _BOXED in truth else truth  # a full reference solution: take its boxed answer
    return 1.0 if truth is not None and normalize(answer) == normalize(truth) else 0.0
