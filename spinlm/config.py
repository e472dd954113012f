"""Load the run configuration: packaged defaults, then a preset, then command-line ``key=value`` overrides.

The override grammar is OmegaConf's dotlist (the same ``a.b=value`` verl users type with Hydra); values are parsed
as YAML, so ``algorithm.beta=[0.1,0.1,5.0]`` gives a list and ``data.val_files=null`` gives None. Hydra's ``+key=`` /
``++key=`` mean ``key=``, and verl's recipe/spin keys are translated to spinlm's (spinlm.verl_compat), the mapping
logged once (to the ``spinlm`` logger, which the CLI prints).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from spinlm.errors import ConfigError

log = logging.getLogger(__name__)


def _config_dir() -> Path:
    return Path(__file__).resolve().parent / "config"


def available_presets() -> list[str]:
    return sorted(p.stem for p in (_config_dir() / "preset").glob("*.yaml"))


def default_config() -> DictConfig:
    return OmegaConf.load(_config_dir() / "default.yaml")


def world_size(nnodes: int, n_gpus_per_node: int, cpu_workers: int) -> int:
    """The number of ranks: nnodes x the ranks per node, which are n_gpus_per_node GPU ranks when GPUs are asked
    for, else cpu_workers CPU ranks (one node: cpu_workers)."""
    return nnodes * (n_gpus_per_node if n_gpus_per_node > 0 else cpu_workers)


def world_size_of(cfg) -> int:
    """The number of ranks a config asks for (see world_size)."""
    t = cfg.trainer
    return world_size(t.nnodes, t.n_gpus_per_node, t.cpu_workers)


def online_dpo_total_steps(cfg) -> int:
    """online_dpo's optimizer steps over the whole run: the length of its one learning-rate schedule. The trainer
    starts the schedule with it and a resumed run restores the schedule with it, so both must use this one number."""
    return cfg.trainer.rounds * cfg.algorithm.ref_update_every


def _parse_overrides(overrides: Iterable[str]) -> DictConfig:
    from spinlm.verl_compat import strip_hydra_prefix

    overrides = [strip_hydra_prefix(o) for o in overrides]
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError([f"override {o!r}: expected key=value (e.g. trainer.rounds=2)" for o in bad])
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as exc:  # omegaconf's grammar errors: name the offending text
        raise ConfigError([f"overrides {list(overrides)}: cannot parse ({exc})"]) from exc


def _from_verl(user: DictConfig, base: DictConfig) -> DictConfig:
    """verl's keys among the overrides become spinlm's; the mapping is logged once."""
    from spinlm.verl_compat import translate

    user, lines = translate(user, lambda u: world_size_of(OmegaConf.merge(base, u)))
    if lines:
        log.info("verl keys translated:\n%s", "\n".join(f"  {line}" for line in lines))
    return user


def load_config(overrides: Iterable[str] | Mapping | DictConfig = ()) -> DictConfig:
    """Defaults <- the preset, when one is named <- overrides. Unknown keys are kept so that the config check can
    name them all."""
    if isinstance(overrides, (Mapping, DictConfig)):
        user = OmegaConf.create(dict(overrides) if isinstance(overrides, Mapping) else overrides)
    else:
        user = _parse_overrides(list(overrides))
    base = default_config()
    preset = user.get("preset", base.preset)
    if preset is not None:
        if preset not in available_presets():
            raise ConfigError([f"preset={preset!r}: unknown preset; expected null or one of {available_presets()}"])
        base = OmegaConf.merge(base, OmegaConf.load(_config_dir() / "preset" / f"{preset}.yaml"))
    cfg = OmegaConf.merge(base, _from_verl(user, base))
    cfg.preset = preset
    return cfg


def load_run_config(config_yaml: Path, overrides: Iterable[str] = ()) -> DictConfig:
    """A run's saved config.yaml (what it trained with) <- overrides, on top of the packaged defaults so that keys
    added since the run have their default values."""
    try:
        saved = OmegaConf.load(config_yaml)
    except Exception as exc:  # omegaconf/yaml parse errors: name the file
        raise ConfigError([f"{config_yaml}: cannot read the run's config ({exc})"]) from exc
    base = OmegaConf.merge(default_config(), saved)
    return OmegaConf.merge(base, _from_verl(_parse_overrides(list(overrides)), base))


def resolved(cfg: DictConfig) -> DictConfig:
    """A copy with interpolations (e.g. ${oc.env:...}) resolved: what the run actually uses."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    return out


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves by dotted key: {"trainer": {"rounds": 2}} -> {"trainer.rounds": 2}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
