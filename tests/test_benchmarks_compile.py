"""Benchmarks are not run by the suite (they are slow), but they must keep up with the code they measure."""
import py_compile
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_script_compiles(script):
    py_compile.compile(str(script), doraise=True)


def test_plateau_study_is_among_the_compiled_scripts():
    """RESULTS.md is written by benchmarks/plateau_study.py: a rename must not drop it from the compile check."""
    names = {p.name for p in BENCHMARKS}
    assert {"plateau_study.py", "quality.py"} <= names  # the study imports quality.py's settings
