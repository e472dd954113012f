"""benchmarks/gpu_check.py, the prepared device check, end to end at its CPU size (--tiny): it must keep working
for the session that has a GPU, and stay within what the GPU machine has (no ray, hydra or vllm)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs the script in a fresh interpreter, then reports which of the forbidden packages got imported.
RUNNER = """
import runpy, sys
sys.argv = ["gpu_check.py", "--tiny", "--no-trl"]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
print("IMPORTED " + ",".join(sorted(m for m in ("ray", "hydra", "vllm") if m in sys.modules)))
"""


def test_gpu_check_tiny_runs_end_to_end_without_ray_hydra_or_vllm():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", RUNNER], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[-1] == "IMPORTED "
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):])
    spin = result["spinlm"]
    run = result["run"]
    assert 0 < spin["rollout_tokens"] <= run["prompts"] * run["response_len"]
    assert spin["rollout_tokens_per_s"] > 0 and spin["update_tokens_per_s"] > 0
    assert spin["master_dtypes"] == ["torch.float32"]  # bf16 compute, fp32 master weights
    assert abs(spin["losses"][0] - 0.6931) < 1e-3  # log 2: policy = opponent at the first step
    assert spin["losses"][-1] < spin["losses"][0]  # the updates move the policy
    offload = result["opponent_offload"]
    assert offload["resident"]["opponent_max_abs_diff"] == 0.0 == offload["offload"]["opponent_max_abs_diff"]
    assert abs(offload["resident"]["first_loss"] - 0.6931) < 1e-3  # reference from the opponent = the policy
    precision = result["precision"]
    assert 0 < precision["max_rel_diff"] < 1e-2 and precision["margin_sign_agreement"] > 0.9
    # FSDP2 on a one-rank gloo group: every decoder layer and the root sharded, the same losses as one process
    fsdp = result["fsdp2"]
    assert fsdp["backend"] == "gloo" and fsdp["fsdp_modules"] == 3  # TINY has 2 decoder layers
    assert fsdp["max_loss_diff_vs_single"] < 1e-2 and fsdp["rollout_tokens"] > 0
    assert fsdp["opponent"]["resident"]["opponent_max_abs_diff"] == 0.0
    assert "update (whole batch):" in out.stdout and "rollout (hf engine)" in out.stdout and "FSDP2 (gloo" in out.stdout


def test_gpu_check_sh_tiny_runs_as_the_readme_shows_it():
    """`benchmarks/gpu_check.sh --tiny` with no PYTHON set: it must pick the project's .venv, not the system python3
    (which has no omegaconf on a fresh machine)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("SPINLM_VENV", str(Path(sys.executable).parents[1]))  # the venv running this suite (.venv in CI)
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--tiny", "--no-trl"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert any(line.startswith("RESULT ") for line in out.stdout.splitlines())
