"""A deterministic generator of short GSM8K-style word problems (the bundled tiny task).

Each problem is a start amount followed by 1-3 operations (add, subtract, optionally a small multiplication
as the opening step). The solution shows one short equation per step and ends in ``#### <answer>``, the
format the GSM8K scorer reads, e.g. ``"12+7=19. 19-5=14.\\n#### 14"``. Problems stay short so that a model of
about a million parameters can learn them.
"""
from __future__ import annotations

import random
from typing import Any

_NAMES = [("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Mia", "She"), ("Sam", "He"), ("Lily", "She"),
          ("Jack", "He"), ("Emma", "She"), ("Leo", "He"), ("Zoe", "She"), ("Max", "He"), ("Ella", "She"),
          ("Noah", "He"), ("Ava", "She"), ("Omar", "He"), ("Nina", "She")]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "coins", "stamps", "shells", "cards"]
_CONTAINERS = ["bags", "boxes", "jars", "baskets"]
_ADD_VERBS = ["buys {n} more", "finds {n} more", "gets {n} more", "wins {n} more"]
_SUB_VERBS = ["gives away {n}", "sells {n}", "loses {n}", "uses {n}"]

# Consecutive duplicate draws after which the requested count is taken to exceed what the knobs allow.
_MAX_MISSES = 10_000


def _make_problem(rng: random.Random, *, min_steps: int, max_steps: int, max_number: int,
                  allow_mul: bool) -> dict[str, Any]:
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    n_steps = rng.randint(min_steps, max_steps)
    steps: list[str] = []     # the solution's equations
    actions: list[str] = []   # the question's verb phrases

    if allow_mul and rng.random() < 0.25:
        # Opening multiplication: "Tom has 3 bags of 4 apples." counts as one step.
        groups, size = rng.randint(2, 5), rng.randint(2, 10)
        value = groups * size
        opening = f"{name} has {groups} {rng.choice(_CONTAINERS)} of {size} {item}."
        steps.append(f"{groups}*{size}={value}.")
        n_ops = n_steps - 1
    else:
        value = rng.randint(1, max_number)
        opening = f"{name} has {value} {item}."
        n_ops = n_steps

    for _ in range(n_ops):
        # Subtract only what is there, so every intermediate amount and the answer stay non-negative.
        if value > 0 and rng.random() < 0.5:
            n = rng.randint(1, min(value, max_number))
            actions.append(rng.choice(_SUB_VERBS).format(n=n))
            steps.append(f"{value}-{n}={value - n}.")
            value -= n
        else:
            n = rng.randint(1, max_number)
            actions.append(rng.choice(_ADD_VERBS).format(n=n))
            steps.append(f"{value}+{n}={value + n}.")
            value += n

    if not actions:
        middle = ""
    elif len(actions) == 1:
        middle = f" {pronoun} {actions[0]}."
    else:
        middle = f" {pronoun} {', '.join(actions[:-1])} and {actions[-1]}."
    question = f"{opening}{middle} How many {item} does {name} have now?"
    solution = " ".join(steps) + f"\n#### {value}"
    return {"question": question, "solution": solution, "answer": value}


def generate_problems(n: int, seed: int, *, min_steps: int = 1, max_steps: int = 3, max_number: int = 50,
                      allow_mul: bool = True) -> list[dict[str, Any]]:
    """``n`` distinct problems, each a dict with ``question``, ``solution`` and ``answer`` (an int >= 0).

    The same arguments always give the same list (a private ``random.Random(seed)``).
    """
    if n < 0:
        raise ValueError(f"n={n}: expected a count >= 0")
    if not 1 <= min_steps <= max_steps <= 3:
        raise ValueError(f"min_steps={min_steps}, max_steps={max_steps}: expected 1 <= min_steps <= max_steps <= 3")
    if max_number < 1:
        raise ValueError(f"max_number={max_number}: expected an integer >= 1")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    misses = 0
    while len(out) < n:
        p = _make_problem(rng, min_steps=min_steps, max_steps=max_steps, max_number=max_number, allow_mul=allow_mul)
        if p["question"] in seen:
            misses += 1
            if misses > _MAX_MISSES:
                raise ValueError(f"n={n}: could only find {len(out)} distinct problems with min_steps={min_steps}, "
                                 f"max_steps={max_steps}, max_number={max_number}; raise max_number or lower n")
            continue
        misses = 0
        seen.add(p["question"])
        out.append(p)
    return out


def to_rows(problems: list[dict[str, Any]], split: str, data_source: str = "tiny_arith") -> list[dict[str, Any]]:
    """verl's RL row format (prompt, data_source, reward_model, extra_info) plus a chat-SFT ``messages`` column."""
    rows = []
    for i, p in enumerate(problems):
        q, sol = p["question"], p["solution"]
        rows.append({
            "data_source": data_source,
            "prompt": [{"role": "user", "content": q}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(p["answer"])},
            "extra_info": {"split": split, "index": i, "answer": sol},
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": sol}],
        })
    return rows
