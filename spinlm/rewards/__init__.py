"""Reward functions with verl's signature ``compute_score(data_source, solution_str, ground_truth, extra_info)``.

``get_reward_fn`` returns either a user's function loaded from a file (``reward.custom_path``) or the built-in
dispatcher that picks a scorer by ``data_source``. ``score_samples`` is where every rule reward is computed (a
reward model's scores come from ``reward_model.py``): a failing or non-numeric score stops the run with the row it
came from, never a silent 0.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import numbers
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterable, Mapping

from spinlm.choices import GSM8K_METHODS
from spinlm.errors import UserError
from spinlm.rewards import exact_match, gsm8k, math_boxed


class RewardError(UserError):
    """A reward function could not be loaded, or failed / returned a non-number for a sample. A UserError: the
    message names the row and the function, so the CLI prints it without a traceback."""


RewardFn = Callable[..., Any]


class RewardTimeout(BaseException):
    """A reward call ran past reward.timeout_s. A BaseException, so that a reward's own `except Exception` cannot
    swallow its deadline; score_samples turns it into a RewardError naming the row."""


def _call_with_deadline(fn: RewardFn, timeout_s: float, *args, **kwargs) -> Any:
    """fn(*args, **kwargs) (verl's signature, positional or by name), interrupted by SIGALRM after timeout_s
    seconds. Signals reach the main thread only: called
    from another thread (not the case in spinlm's driver) the call has no deadline."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)

    def expire(signum, frame):
        raise RewardTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

GSM8K_SOURCES = ("openai/gsm8k", "gsm8k", "tiny_arith")
MATH_SOURCES = ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "math", "math_dapo")
EXACT_SOURCES = ("exact_match",)
KNOWN_DATA_SOURCES = GSM8K_SOURCES + MATH_SOURCES + EXACT_SOURCES


def _cfg_get(cfg: Mapping | Any, key: str, default: Any = None) -> Any:
    """reward_cfg may be a dict or an OmegaConf node."""
    return cfg.get(key, default) if cfg is not None else default


def _builtin(data_source: str, solution_str: str, ground_truth: str | None, extra_info: dict | None = None,
             *, gsm8k_method: str = "strict", format_score: float = 0.0) -> float:
    if data_source in GSM8K_SOURCES:
        return gsm8k.compute_score(data_source, solution_str, ground_truth, extra_info, method=gsm8k_method,
                                   format_score=format_score)
    if data_source in MATH_SOURCES:
        return math_boxed.compute_score(data_source, solution_str, ground_truth, extra_info)
    if data_source in EXACT_SOURCES:
        return exact_match.compute_score(data_source, solution_str, ground_truth, extra_info)
    raise RewardError(f"no built-in reward for data_source {data_source!r}; known: {', '.join(KNOWN_DATA_SOURCES)} "
                      "(or set reward.custom_path to a file with your compute_score)")


def _load_custom(path: str, name: str) -> RewardFn:
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise RewardError(f"reward.custom_path={path!r}: file not found")
    module_name = "spinlm_custom_reward_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, full)
    if spec is None or spec.loader is None:
        raise RewardError(f"reward.custom_path={path!r}: cannot be imported as a Python module (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # so that pickling (e.g. to Ray workers) can find the function
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # SyntaxError, ImportError, sys.exit() ... in user code: say which
        sys.modules.pop(module_name, None)
        raise RewardError(f"reward.custom_path={path!r}: importing it failed with "
                          f"{type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardError(f"reward.custom_name={name!r}: {path} has no function of that name")
    if not callable(fn):
        raise RewardError(f"reward.custom_name={name!r}: {path} defines it, but as {type(fn).__name__}, "
                          "not a function")
    return fn


def get_reward_fn(reward_cfg: Mapping | Any, *, judging: bool = False) -> RewardFn:
    """The reward function a run uses, from the ``reward:`` config section, each call limited to reward.timeout_s
    seconds. judging: the one that scores training samples, with ``reward.format_score`` for a well-formed wrong
    GSM8K answer; accuracy (val/acc, `spinlm evaluate`) counts right answers only."""
    custom_path = _cfg_get(reward_cfg, "custom_path")
    if custom_path:
        fn = _load_custom(str(custom_path), str(_cfg_get(reward_cfg, "custom_name", "compute_score")))
    else:
        method = _cfg_get(reward_cfg, "gsm8k_method", "strict")
        if method not in GSM8K_METHODS:
            raise RewardError(f"reward.gsm8k_method={method!r}: expected {' | '.join(GSM8K_METHODS)}")
        format_score = float(_cfg_get(reward_cfg, "format_score", 0.0) or 0.0) if judging else 0.0
        fn = functools.partial(_builtin, gsm8k_method=method, format_score=format_score)
        fn.__name__ = "builtin_reward"  # type: ignore[attr-defined]  # for error messages
    timeout_s = _cfg_get(reward_cfg, "timeout_s")
    if not timeout_s:
        return fn
    limited = functools.partial(_call_with_deadline, fn, float(timeout_s))
    limited.__name__ = getattr(fn, "__name__", type(fn).__name__)  # type: ignore[attr-defined]
    limited.timeout_s = float(timeout_s)  # type: ignore[attr-defined]  # for the message
    return limited


def check_reward(reward_cfg: Mapping | Any, data_sources: Iterable[str] | None = None) -> list[str]:
    """Pre-flight problems with the reward setup. Imports the custom file, if any (that runs its top level).

    With ``data_sources`` (those found in the data) and no custom function, also names any source that no
    built-in reward handles.
    """
    try:
        get_reward_fn(reward_cfg)
    except RewardError as exc:
        return [str(exc)]
    if _cfg_get(reward_cfg, "custom_path") or data_sources is None:
        return []
    unknown = sorted(set(data_sources) - set(KNOWN_DATA_SOURCES))
    if unknown:
        return [f"data_source {', '.join(map(repr, unknown))}: no built-in reward; known: "
                f"{', '.join(KNOWN_DATA_SOURCES)} (or set reward.custom_path)"]
    return []


def _as_score(value: Any) -> float | None:
    """verl's custom functions may return a number or a dict with 'score'."""
    if isinstance(value, Mapping) and "score" in value:
        value = value["score"]
    if isinstance(value, numbers.Real):
        score = float(value)
        return score if math.isfinite(score) else None
    return None


def score_samples(fn: RewardFn, items: list[tuple[str, str, str | None, dict, str]]) -> list[float]:
    """Score (data_source, solution_str, ground_truth, extra_info, origin) items with ``fn``.

    Called with keyword arguments, as verl calls a custom compute_score.
    """
    name = getattr(fn, "__name__", type(fn).__name__)
    scores = []
    for data_source, solution_str, ground_truth, extra_info, origin in items:
        try:
            value = fn(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth,
                       extra_info=extra_info)
        except RewardTimeout:
            raise RewardError(f"{origin}: reward function {name} did not return within reward.timeout_s="
                              f"{getattr(fn, 'timeout_s', '?')} s (stopped; raise reward.timeout_s if it is just "
                              "slow)") from None
        except SystemExit as exc:  # sys.exit() in a scorer would end the run with its code and no word
            raise RewardError(f"{origin}: reward function {name} called sys.exit({exc.code!r}); a reward must return "
                              "a number") from exc
        except Exception as exc:  # any failure of the (possibly user-written) scorer stops the run, named
            raise RewardError(f"{origin}: reward function {name} raised {type(exc).__name__}: {exc}") from exc
        score = _as_score(value)
        if score is None:
            raise RewardError(f"{origin}: reward function {name} returned {value!r} ({type(value).__name__}); "
                              "expected a finite number (or a dict with a finite 'score')")
        scores.append(score)
    return scores


def score_responses(fn: RewardFn, items, texts: list[str]) -> list[float]:
    """Score decoded responses to TokenizedExamples (one text per item) with ``fn``, against each item's ground truth."""
    return score_samples(fn, [(it.example.data_source, text, it.example.ground_truth, it.example.extra_info,
                               it.example.origin) for it, text in zip(items, texts)])


__all__ = ["RewardError", "KNOWN_DATA_SOURCES", "get_reward_fn", "check_reward", "score_samples", "score_responses"]
