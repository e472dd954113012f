"""The package's layering (docs/ARCHITECTURE.md): every import, module-level or inside a function, points to the
same layer or a lower one, and rewards/ and workers/ never import each other."""
from __future__ import annotations

import ast
from pathlib import Path

import spinlm

PACKAGE = Path(spinlm.__file__).resolve().parent

# lowest first; a module's layer is that of its longest matching prefix
LAYERS = [
    ["spinlm.errors", "spinlm.choices", "spinlm.pairs", "spinlm.crash_points", "spinlm.extras", "spinlm.hub", "spinlm.allocator", "spinlm.process_defaults",
     "spinlm.seeding", "spinlm.config", "spinlm.verl_compat", "spinlm.run_dir", "spinlm.core_algos", "spinlm.data",
     "spinlm.tasks.arith", "spinlm.tasks.tiny_model"],
    ["spinlm.modeling", "spinlm.rollout", "spinlm.rewards", "spinlm.evaluate", "spinlm.lm_eval_tasks",
     "spinlm.tracking", "spinlm.report", "spinlm.model_card", "spinlm.prepare_model", "spinlm.config_check"],
    ["spinlm.workers"],
    ["spinlm.spin_trainer"],
    ["spinlm.main_spin", "spinlm.sft", "spinlm.evaluate_command", "spinlm.tasks.build"],
    ["spinlm.api", "spinlm.cli", "spinlm"],
]


def layer_of(module: str) -> int:
    matches = [(len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module}: not placed in any layer (add it to LAYERS and docs/ARCHITECTURE.md)"
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "spinlm":
            for alias in node.names:  # `from spinlm.rewards import gsm8k` imports the submodule
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "spinlm"}
    return found


def edges() -> list[tuple[str, str]]:
    return sorted((module_name(f), target) for f in PACKAGE.rglob("*.py") for target in imports_of(f))


def test_every_import_points_down_or_sideways():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})" for a, b in edges()
              if layer_of(b) > layer_of(a)]
    assert upward == []


def test_rewards_and_workers_never_import_each_other():
    top = lambda m: (m.split(".") + [""])[1]  # noqa: E731
    crossing = [(a, b) for a, b in edges() if {top(a), top(b)} == {"rewards", "workers"}]
    assert crossing == []


def test_the_layer_check_sees_known_edges():
    """A check that found no imports would pass vacuously: it must see edges that are known to exist."""
    found = set(edges())
    assert ("spinlm.main_spin", "spinlm.spin_trainer") in found
    assert ("spinlm.workers.fsdp_workers", "spinlm.modeling") in found
    assert layer_of("spinlm.rewards.gsm8k") == 1 and layer_of("spinlm.workers.lora") == 2
