"""spinlm's optional extras (pyproject's optional-dependencies): which settings need which package, whether it is
installed (found without importing it), and the install command that works for this checkout.

spinlm is installed from its source tree, not from the package index, so the advice is ``pip install -e
"<checkout>[extra]"``, never ``pip install spinlm[extra]``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

# extra -> the module that must be importable for it
EXTRA_MODULES = {"eval": "lm_eval", "lora": "peft", "vllm": "vllm", "gguf": "gguf", "ray": "ray",
                 "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# trackers are one extra in pyproject; each logger needs only its own package
EXTRA_OF_TRACKER = {"tensorboard": "trackers", "wandb": "trackers", "mlflow": "trackers"}

CHECKOUT = Path(__file__).resolve().parent.parent


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed install counts as missing
        return False


def install_hint(extra: str) -> str:
    """The command that installs an extra into the environment spinlm runs from."""
    pyproject_extra = EXTRA_OF_TRACKER.get(extra, extra)
    if (CHECKOUT / "pyproject.toml").is_file():
        return f'pip install -e "{CHECKOUT}[{pyproject_extra}]"'
    return f'pip install -e ".[{pyproject_extra}]" in the spinlm checkout'


def missing_extra(extra: str) -> str | None:
    """None when the extra's package is importable, else what to run to install it."""
    return None if installed(EXTRA_MODULES[extra]) else install_hint(extra)
