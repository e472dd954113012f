"""The Python entry point for notebooks and scripts: ``spinlm.train(...)`` is ``spinlm train ...`` as a function.
Both go through the same steps: load the config, check it (spinlm/config_check.py), run, write the report."""
from __future__ import annotations

from typing import Iterable, Mapping


def train(config: Iterable[str] | Mapping | None = None):
    """Run SPIN / online-DPO rounds and return a RunResult (``.rounds``: the round table as in rounds.json,
    ``.run_dir``, ``.report``: the report.html path).

    config: ``key=value`` overrides as on the command line (``["preset=tiny", "trainer.rounds=2"]``), a dict
    (nested, ``{"trainer": {"rounds": 2}}``, or with dotted keys, ``{"trainer.rounds": 2}``), or an OmegaConf
    config. A bad config raises ConfigError listing every problem; a bad input raises UserError.
    """
    from omegaconf import DictConfig, OmegaConf

    from spinlm.config import load_config
    from spinlm.config_check import validate
    from spinlm.tasks.build import ensure_bundled_task

    if isinstance(config, Mapping) and not isinstance(config, DictConfig):
        nested = OmegaConf.create()
        for key, value in config.items():  # dotted keys become nested ones, as on the command line
            OmegaConf.update(nested, str(key), value, merge=True)
        config = nested
    cfg = load_config(config if config is not None else ())
    ensure_bundled_task(cfg)
    validate(cfg)  # before torch is imported: a bad config is reported in a fraction of a second
    from spinlm.main_spin import run_and_report

    return run_and_report(cfg)
