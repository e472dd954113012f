"""GSM8K-style answer match: the final number of a solution against the ground truth (verl's signature)."""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number with optional thousands commas and decimals; not a minus sign that joins two numbers ("3-4").
_NUMBER = re.compile(r"(?<![\d.])-?\d[\d,]*(?:\.\d+)?")
_MARK = "#### "


def _clean(number: str) -> str:
    return number.replace(",", "")


def extract_solution(text: str, method: str = "strict") -> str | None:
    """strict: the number right after the last '#### '; flexible: the last number anywhere in the text."""
    if method == "strict":
        pos = text.rfind(_MARK)
        if pos < 0:
            return None
        match = _NUMBER.match(text[pos + len(_MARK):].lstrip().lstrip("$"))
        return _clean(match.group(0)) if match else None
    if method == "flexible":
        numbers = _NUMBER.findall(text)
        return _clean(numbers[-1]) if numbers else None
    raise ValueError(f"gsm8k method {method!r}: expected strict | flexible")


def _as_number(text: str) -> Decimal | None:
    try:
        value = Decimal(_clean(text.strip()))
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def answers_match(predicted: str, ground_truth: str) -> bool:
    """Numeric equality when both sides parse as numbers ("19" == "19.0"), else string equality."""
    a, b = _as_number(predicted), _as_number(ground_truth)
    if a is not None and b is not None:
        return a == b
    return predicted.strip() == ground_truth.strip()


def compute_score(data_source: str, solution_str: str, ground_truth: str | None, extra_info: dict | None = None,
                  method: str = "strict", format_score: float = 0.0) -> float:
    """1 for the right answer, format_score for a wrong one in the expected form (an answer was found: after
    '#### ' in strict), 0 for none (verl's gsm8k scorer)."""
    if ground_truth is None:
        raise ValueError("gsm8k reward needs a ground truth (reward_model.ground_truth), got none")
    answer = extract_solution(solution_str, method)
    if answer is None:
        return 0.0
    return 1.0 if answers_match(answer, str(ground_truth)) else float(format_score)
