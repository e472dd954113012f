"""Ray actors as torch.distributed ranks (gloo on CPU) with FSDP2: the same numbers as one in-process rank,
a dead rank reported by name with the checkpoint intact, and resume across world sizes. On a real two-node Ray
cluster (two `ray start` processes on this machine): one rank per node, placed on two nodes, the samples and
weights of one rank whatever the rollout batch; too few nodes refused at once; `ray job submit` runs a training
job."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("ray")

from spinlm.config import load_config, resolved  # noqa: E402
from spinlm.data.items import load_items  # noqa: E402
from spinlm.errors import UserError  # noqa: E402
from spinlm.pairs import Pairs  # noqa: E402
from spinlm.workers.dp_actor import LossSettings, micro_batches  # noqa: E402
from spinlm.modeling import load_tokenizer  # noqa: E402
from spinlm.workers.worker_group import LocalWorkerGroup, RayWorkerGroup  # noqa: E402

SMOKE = ["preset=smoke", "trainer.eval_before_training=false", "data.val_max_samples=8"]


def three_steps(group, pairs: Pairs, batch: int) -> list[float]:
    ref_c = group.sequence_logps(pairs.prompts, pairs.chosen)
    ref_r = group.sequence_logps(pairs.prompts, pairs.rejected)
    group.start_schedule(3)
    losses = []
    for s in range(3):
        idx = list(range(s * batch, (s + 1) * batch))
        losses.append(group.update(pairs.select(idx), LossSettings(beta=0.5), ref=(ref_c[idx], ref_r[idx]))["loss"])
    return losses


def test_two_ray_ranks_match_one_in_process_rank(tiny_task, tmp_path):
    """Also under a token budget that cuts the two ranks' shards into different numbers of micro-batches (rank 0's
    pairs are long, rank 1's short): the short rank pads with forwards of weight 0 (before: mismatched FSDP
    collectives, a hang)."""
    settings = [*SMOKE, f"trainer.output_dir={tmp_path}", "actor.lr=1e-3", "actor.eps=1e-3", "actor.warmup_ratio=0"]
    cfg = resolved(load_config(settings))
    tok = load_tokenizer(cfg.model.path)
    items, _ = load_items(cfg.data, tok, cfg.data.train_files, need_response=True)
    items = items[:48]  # 3 steps x 16 pairs; each step's first 8 go to rank 0, the last 8 to rank 1
    rejected = [it.response_ids[:-1] * 3 + [tok.eos_token_id] if i % 16 < 8
                else it.response_ids[: max(1, len(it.response_ids) // 2)] + [tok.eos_token_id]
                for i, it in enumerate(items)]
    pairs = Pairs([it.prompt_ids for it in items], [it.response_ids for it in items], rejected)
    lengths = [2 * len(p) + len(c) + len(r) for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected)]
    budget = 2 * max(lengths)
    counts = [len(micro_batches(lengths[a:a + 8], max_items=cfg.actor.micro_batch_size, max_tokens=budget))
              for a in (0, 8)]
    assert counts[0] > counts[1], counts  # the case this test is about
    settings.append(f"actor.max_tokens_per_micro_batch={budget}")

    local = LocalWorkerGroup(resolved(load_config(settings)), cfg.model.path, keep_opponent=False)
    local_losses = three_steps(local, pairs, 16)
    local.save(tmp_path / "one", with_optimizer=False)

    cfg2 = resolved(load_config([*settings, "trainer.cpu_workers=2"]))
    group = RayWorkerGroup(cfg2, cfg.model.path, keep_opponent=False, run_dir=tmp_path)
    try:
        ray_losses = three_steps(group, pairs, 16)
        group.save(tmp_path / "two", with_optimizer=False)
    finally:
        group.shutdown()
    assert max(abs(a - b) for a, b in zip(local_losses, ray_losses)) < 1e-5
    assert local_losses[0] != local_losses[2]  # the steps really moved the weights
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


def cli(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinlm.cli", "train", *SMOKE, *extra, f"trainer.output_dir={run_dir}"],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def ray_processes_of(run_dir: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if "ray" in line and str(run_dir) in line]


def pairs_and_weights(run_dir: Path, t: int) -> tuple[list[dict], dict]:
    import pyarrow.parquet as pq

    return (pq.read_table(run_dir / "rounds" / str(t) / "pairs.parquet").to_pylist(),
            load_file(run_dir / "checkpoints" / str(t) / "model.safetensors"))


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_online_dpo_is_world_size_invariant_and_resumes_onto_another_world_size(tiny_task, tmp_path):
    # actor.eps=1e-3: with Adam's 1e-8, a weight whose gradient is ~0 moves by about lr on fp32 noise alone (the
    # sum over 2 ranks is ordered differently), which is not what this test measures
    # format_score: enough pairs each round whatever the last bits of an update (a 0/1 reward alone can tie most prompts)
    mode = ["algorithm.mode=online_dpo", "rollout.n=4", "actor.eps=1e-3", "reward.format_score=0.1"]
    whole = cli(tmp_path / "one", *mode, "trainer.rounds=2")
    first = cli(tmp_path / "two", *mode, "trainer.rounds=2", "rollout.batch_size=7", "trainer.cpu_workers=2",
                env={"SPINLM_KILL_AT": "update:3", "SPINLM_KILL_RANK": "1"})  # rank 1 dies in round 2
    assert whole.returncode == 0 and first.returncode == 2, (whole.stderr + first.stderr)[-3000:]
    # the dead rank stops the run by name, keeps round 1's checkpoint and leaves no Ray process behind
    assert "rank 1 (Ray actor) died" in first.stderr and "Traceback" not in first.stderr, first.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoints" / "latest").read_text().strip() == "1"
    assert ray_processes_of(tmp_path / "two") == []
    (p1, w1), (p2, w2) = pairs_and_weights(tmp_path / "one", 1), pairs_and_weights(tmp_path / "two", 1)
    assert len(p1) >= 4 and p1 == p2
    assert max_weight_diff(w1, w2) < 1e-5
    assert (tmp_path / "two" / "checkpoints" / "1" / "optimizer" / ".metadata").exists()  # sharded optimizer state
    # 2 ranks -> 1 rank: DCP reshards the optimizer state (this also covers resuming a multi-rank run at all)
    rest = cli(tmp_path / "two", *mode, "trainer.rounds=2", "trainer.cpu_workers=1")
    assert rest.returncode == 0 and "spinlm: resuming from" in rest.stderr, rest.stderr[-3000:]
    (p1, w1), (p2, w2) = pairs_and_weights(tmp_path / "one", 2), pairs_and_weights(tmp_path / "two", 2)
    assert p1 == p2
    assert max_weight_diff(w1, w2) < 1e-5


def test_sigterm_under_ray_stops_cleanly(tiny_task, tmp_path):
    """ray.init replaces the driver's SIGTERM handler (before: exit 1 and a C++ stack dump); spinlm keeps its own:
    a message, exit 143, the ranks and the local Ray instance shut down, no half-written checkpoint."""
    run_dir = tmp_path / "t"
    done = cli(run_dir, "trainer.cpu_workers=2", "trainer.rounds=1",
               env={"SPINLM_KILL_AT": "checkpoint_write:1", "SPINLM_KILL_SIGNAL": "SIGTERM"})  # the driver, mid-save
    assert done.returncode == 143, done.stderr[-3000:]
    assert "spinlm train: terminated (SIGTERM); the last complete checkpoint is kept" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(run_dir.glob("checkpoints/.tmp-*")) and not (run_dir / "checkpoints" / "latest").exists()
    assert not (run_dir / ".lock").exists()
    assert ray_processes_of(run_dir) == []


# ---- a real two-node Ray cluster -------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))  # the venv's ray, so every node runs the venv's python
PLACEMENT = re.compile(r"ranks \[(\d+)\] on node ([0-9a-f]{56}) at ")


def dashboard_missing() -> str | None:
    """Why the installed Ray cannot run its dashboard (the job server `ray job submit` talks to), or None."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (the import Ray itself uses to decide)
    except ImportError as exc:
        return f"{exc} (ray[default] is not installed)"
    return None


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    address: str            # the head's GCS address, for ray.address
    dashboard: str | None   # the job server's URL, when the dashboard runs
    temp_root: Path


def start_ray_node(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """`ray start --block ...`: blocks while the node runs, and on SIGTERM stops the processes it started (so the
    teardown touches only this cluster, where `ray stop` would stop every Ray on the machine)."""
    with log.open("w") as out:
        proc = subprocess.Popen([RAY, "start", "--block", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 90
    while "block forever" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"ray start {' '.join(args)} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    return proc


def stop_ray_node(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def two_nodes(tiny_task):
    """A head and a second node, 1 CPU each, on this machine; with the dashboard when the installed Ray has it."""
    temp_root = Path(tempfile.mkdtemp(prefix="spinlm-rc-"))  # short: Ray's unix socket paths stay < 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # a job's `python`
    port, dashboard_port = free_tcp_port(), free_tcp_port()
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]

    def own_ports() -> list[str]:
        # Ray's per-node agents default to fixed ports (52365, ...): a second Ray on the machine, such as another
        # test worker's local ray.init, holds them, the head's job agent cannot bind, and every submit is refused
        return [f"--{flag}={free_tcp_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                           "runtime-env-agent-port", "metrics-export-port")]
    dashboard = (["--include-dashboard=false"] if dashboard_missing() else
                 ["--include-dashboard=true", "--dashboard-host=127.0.0.1"])
    nodes = []
    try:
        nodes.append(start_ray_node(["--head", f"--port={port}", f"--dashboard-port={dashboard_port}", *dashboard,
                                     *common, *own_ports(), f"--temp-dir={temp_root / 'h'}"], temp_root / "head.log", env))
        nodes.append(start_ray_node([f"--address=127.0.0.1:{port}", *common, *own_ports(), f"--temp-dir={temp_root / 'n'}"],
                                    temp_root / "node.log", env))
        yield RayCluster(f"127.0.0.1:{port}", None if dashboard_missing() else f"http://127.0.0.1:{dashboard_port}",
                         temp_root)
    finally:
        for proc in reversed(nodes):
            stop_ray_node(proc)
    assert ray_processes_of(temp_root) == []
    shutil.rmtree(temp_root)  # the nodes' sessions and logs


def ranks_by_node(log: str) -> dict[int, str]:
    """Each rank's Ray node id, from the driver's placement line."""
    return {int(rank): node for rank, node in PLACEMENT.findall(log)}


@pytest.mark.slow
def test_two_nodes_run_one_rank_each_and_train_what_one_rank_trains(tiny_task, tmp_path, two_nodes):
    """Every draw is a function of (seed, round, prompt key, sample index, position): one in-process rank with
    rollout.batch_size 64 and two Ray ranks on two nodes with rollout.batch_size 7 train on the same pairs."""
    one = cli(tmp_path / "one", "trainer.rounds=1", "rollout.batch_size=64")
    two = cli(tmp_path / "two", "trainer.rounds=1", "rollout.batch_size=7", "trainer.nnodes=2",
              f"ray.address={two_nodes.address}", env={"RAY_AUTH_MODE": "disabled"})
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    nodes = ranks_by_node(two.stderr)
    assert set(nodes) == {0, 1} and nodes[0] != nodes[1], two.stderr[-3000:]
    (pairs_one, w_one), (pairs_two, w_two) = pairs_and_weights(tmp_path / "one", 1), pairs_and_weights(tmp_path / "two", 1)
    assert len(pairs_one) == 32 and pairs_one == pairs_two
    assert max_weight_diff(w_one, w_two) < 1e-5


@pytest.mark.slow
def test_one_node_of_two_cpu_ranks_is_refused_on_a_cluster_of_one_cpu_nodes(tiny_task, tmp_path, two_nodes,
                                                                              monkeypatch):
    """trainer.nnodes=1 means the ranks share one node: 2 CPUs in all are not enough when no node has 2. Joined
    as inside `ray job submit`, which sets RAY_ADDRESS: ray.address=auto finds the cluster through it."""
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_ADDRESS", two_nodes.address)
    cfg = resolved(load_config([*SMOKE, f"trainer.output_dir={tmp_path}", "trainer.cpu_workers=2", "ray.address=auto"]))
    with pytest.raises(UserError) as caught:
        RayWorkerGroup(cfg, cfg.model.path, keep_opponent=False, run_dir=tmp_path)
    assert not ray.is_initialized()  # the driver left the cluster
    message = str(caught.value)
    assert message.startswith("trainer.nnodes=1: the ranks need 1 Ray node(s) with 2 CPU rank(s) each (bundle "
                              "{'CPU': 2}), but the Ray cluster has 2 alive node(s), 0 of them big enough: "), message
    assert message.count(": 1 CPU, 0 GPU)") == 2


def test_more_nodes_than_a_local_ray_has_is_refused_at_once(tiny_task, tmp_path):
    import ray

    from spinlm.workers.worker_group import PLACEMENT_TIMEOUT_S

    cfg = resolved(load_config([*SMOKE, f"trainer.output_dir={tmp_path}", "trainer.nnodes=2"]))
    start = time.monotonic()
    with pytest.raises(UserError) as caught:
        RayWorkerGroup(cfg, cfg.model.path, keep_opponent=False, run_dir=tmp_path)
    assert time.monotonic() - start < PLACEMENT_TIMEOUT_S  # refused before any wait for a placement
    assert not ray.is_initialized()
    message = str(caught.value)
    assert message.startswith("trainer.nnodes=2: the ranks need 2 Ray node(s) with 1 CPU rank(s) each (bundle "
                              "{'CPU': 1}), but the Ray cluster has 1 alive node(s), 1 of them big enough: "), message
    assert message.endswith("; several nodes need a cluster: set ray.address")


@pytest.mark.slow
def test_ray_job_submit_trains_on_the_cluster(tiny_task, tmp_path, request):
    """How verl users launch: the entrypoint runs inside the cluster, where ray.address=auto joins it."""
    if missing := dashboard_missing():
        pytest.skip(f"`ray job submit` needs Ray's dashboard (the job server): {missing}")
    cluster = request.getfixturevalue("two_nodes")
    run_dir = tmp_path / "job"
    runtime_env = {"env_vars": {"SPINLM_TINY_DIR": os.environ["SPINLM_TINY_DIR"]}}
    submit = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
              "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "spinlm.cli", "train", *SMOKE,
              "trainer.rounds=1", "trainer.nnodes=2", "ray.address=auto", f"trainer.output_dir={run_dir}"]
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run(submit, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True,
                              text=True, timeout=600)
        # the head's job agent comes up some seconds after `ray start` returns; Ray says to try again, nothing ran
        if "No available agent to submit job" not in done.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0 and "succeeded" in done.stdout, (done.stdout + done.stderr)[-3000:]
    nodes = ranks_by_node(done.stdout)
    assert set(nodes) == {0, 1} and nodes[0] != nodes[1], done.stdout[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "1"
    assert load_file(run_dir / "checkpoints" / "1" / "model.safetensors")
