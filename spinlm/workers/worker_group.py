"""Worker groups: the trainer's one handle on the ranks, in-process (world size 1) or Ray actors (N ranks).

`WorkerGroup` is the contract: the methods the trainer calls, and the driver's split and gather. It splits prompts
across ranks for rollout, sequences for log-prob passes and pairs for the update (each rank's loss divided by global
pairs / world size, since FSDP averages gradients), and combines the ranks' metrics. Ranks must run the same number
of forwards (FSDP all-gathers in each), so a short rank gets zero-weight padding copies.

How a call travels to the ranks is the subclasses' part, and only that: `LocalWorkerGroup` calls one in-process
PolicyWorker, `RayWorkerGroup` one Ray actor per rank. Calls name the PolicyWorker method itself
(`self._each(PolicyWorker.update, ...)`); only at the Ray boundary does it travel as its name.

Placement: the Ray ranks live in a placement group of one bundle per node (trainer.nnodes bundles, STRICT_SPREAD
when there are several), rank r in bundle r // ranks per node, and the torch.distributed group meets at rank 0's
node, wherever Ray put it.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import tempfile
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import torch

from spinlm.config import world_size_of
from spinlm.errors import UserError
from spinlm.pairs import Pairs
from spinlm.rollout.hf_rollout import Rollout
from spinlm.seeding import GLOBAL, seed_for
from spinlm.workers.dp_actor import LossSettings
from spinlm.workers.fsdp_workers import PolicyWorker

log = logging.getLogger(__name__)

# How long the cluster may take to place the ranks' bundles once enough nodes exist (they may be busy with another
# job); past it the run stops naming the cluster's nodes rather than waiting forever.
PLACEMENT_TIMEOUT_S = 120.0

MEAN_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logps/ref_chosen", "logps/ref_rejected", "train/sft_nll", "train/sft_share")


def even_chunks(n: int, world: int) -> list[range]:
    per = math.ceil(n / world) if n else 0
    return [range(min(r * per, n), min((r + 1) * per, n)) for r in range(world)]


def padded_split(items: list, world: int) -> tuple[list[list], list[int]]:
    """Split into `world` equal-length chunks, padding short ones with copies of items[0]; returns chunks and the
    number of real items in each."""
    chunks, real = [], []
    per = math.ceil(len(items) / world)
    for r in range(world):
        part = items[r * per : (r + 1) * per]
        real.append(len(part))
        chunks.append(part + [items[0]] * (per - len(part)))
    return chunks, real


def combine_metrics(per_rank: list[dict]) -> dict:
    """Means weighted by each rank's real pairs; counts summed; the rest (grad norm, lr, skipped) agree across ranks."""
    pairs = [m["train/pairs"] for m in per_rank]
    total = sum(pairs)
    out = dict(per_rank[0])
    for k in MEAN_METRICS:
        out[k] = sum(m[k] * p for m, p in zip(per_rank, pairs)) / max(total, 1.0)
    out["train/pairs"] = total
    out["train/tokens"] = sum(m["train/tokens"] for m in per_rank)
    return out


class WorkerGroup(ABC):
    """What the trainer calls, identical for every group; subclasses only carry a call to the ranks (`_each`)."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    @abstractmethod
    def _each(self, method: Callable[..., Any], per_rank_args: list[tuple], **kwargs) -> list:
        """`method(worker, *per_rank_args[r], **kwargs)` on every rank r's PolicyWorker; the results in rank order."""

    def _all(self, method: Callable[..., Any], *args, **kwargs) -> list:
        """The same call on every rank."""
        return self._each(method, [args] * self.world_size, **kwargs)

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the ranks and what they started."""

    # ---- split and gather -------------------------------------------------------------------------------------------
    def generate(self, prompts, params, seed: int, keys: list[int], desc: str = "generate") -> Rollout:
        """``keys``: each prompt's stable id. A sample depends on (seed, key, sample index, position) only, so the
        split across ranks changes nothing."""
        parts = [(prompts[c.start : c.stop], params, seed, desc, keys[c.start : c.stop])
                 for c in even_chunks(len(prompts), self.world_size)]
        outs = self._each(PolicyWorker.generate, parts)
        return Rollout(sum((o.responses for o in outs), []), sum((o.ended for o in outs), []))

    def sequence_logps(self, prompts, responses, *, opponent: bool = False, desc: str | None = None) -> torch.Tensor:
        chunks, real = padded_split(list(zip(prompts, responses)), self.world_size)
        outs = self._each(PolicyWorker.sequence_logps, [([p for p, _ in c], [r for _, r in c]) for c in chunks],
                          opponent=opponent, desc=desc)
        return torch.cat([o[:n] for o, n in zip(outs, real)])

    def update(self, pairs: Pairs, loss: LossSettings, ref: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """One optimizer step over `pairs`, split across ranks. `ref`: the reference's (chosen, rejected) log-probs,
        precomputed (mode spin: once per round, before its epochs); None: each rank computes them for its share,
        padding copies included, with its resident opponent (online_dpo), so each pair travels to the ranks once.
        The split is the one sequence_logps makes, so the numbers are the same either way."""
        idx_chunks, real = padded_split(list(range(len(pairs))), self.world_size)
        args = []
        for idx, n in zip(idx_chunks, real):
            part = pairs.select(idx)
            part.weights = [1.0] * n + [0.0] * (len(idx) - n)
            args.append((part, loss, len(pairs), None if ref is None else (ref[0][idx], ref[1][idx])))
        return combine_metrics(self._each(PolicyWorker.update, args))

    # ---- the same call on every rank ----------------------------------------------------------------------------------
    def start_schedule(self, total_steps: int) -> None:
        self._all(PolicyWorker.start_schedule, total_steps)

    def has_schedule(self) -> bool:
        return self._all(PolicyWorker.has_schedule)[0]

    def skip_step(self) -> None:
        self._all(PolicyWorker.skip_step)

    def refresh_opponent(self) -> None:
        self._all(PolicyWorker.refresh_opponent)

    def save(self, path, with_optimizer: bool) -> None:
        self._all(PolicyWorker.save, str(path), with_optimizer)

    def load_optimizer(self, path, total_steps: int) -> None:
        self._all(PolicyWorker.load_optimizer, str(path), total_steps)

    def peak_memory_bytes(self) -> int:
        return max(self._all(PolicyWorker.peak_memory_bytes))


class LocalWorkerGroup(WorkerGroup):
    """One in-process worker: the default, no Ray needed."""

    def __init__(self, cfg, model_path: str, *, keep_opponent: bool):
        super().__init__(world_size=1)
        self.worker = PolicyWorker(cfg, model_path, keep_opponent=keep_opponent)

    def _each(self, method: Callable[..., Any], per_rank_args: list[tuple], **kwargs) -> list:
        (args,) = per_rank_args
        return [method(self.worker, *args, **kwargs)]

    def shutdown(self) -> None:
        self.worker.close()


class RankActor:
    """One torch.distributed rank inside a Ray actor, holding a PolicyWorker. It starts in two steps: first it says
    where it runs (`node_info`, and rank 0 a free port there), then `join` meets the other ranks at rank 0's address
    and loads the model."""

    def __init__(self, env: dict):
        os.environ.update(env)
        self.worker: PolicyWorker | None = None

    def node_info(self) -> tuple[str, str]:
        """(Ray node id, node IP address) of the node this rank runs on."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def free_port(self) -> int:
        return free_port()

    def join(self, cfg_container: dict, model_path: str, keep_opponent: bool, rank: int, world_size: int,
             master_addr: str, master_port: int) -> None:
        import torch.distributed as dist
        from omegaconf import OmegaConf

        os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                           "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"})  # Ray pins one GPU per actor
        cfg = OmegaConf.create(cfg_container)
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        backend = "nccl" if torch.cuda.is_available() and cfg.trainer.n_gpus_per_node > 0 else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        torch.manual_seed(seed_for(cfg, GLOBAL))
        self.worker = PolicyWorker(cfg, model_path, keep_opponent=keep_opponent)

    def call(self, method_name: str, *args, **kwargs):
        """The one place a PolicyWorker method travels by name: Ray sends the name, not the function."""
        return getattr(self.worker, method_name)(*args, **kwargs)


def free_port() -> int:
    """A TCP port free on every interface of this machine now (rank 0's torch.distributed store listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def ranks_per_node(cfg) -> int:
    """The ranks each of the trainer.nnodes nodes runs: n_gpus_per_node GPU ranks, or cpu_workers CPU ranks."""
    return cfg.trainer.n_gpus_per_node if cfg.trainer.n_gpus_per_node > 0 else cfg.trainer.cpu_workers


def describe_nodes(nodes: list[dict]) -> str:
    """Ray nodes (ray.nodes() entries) as `IP (node 1a2b3c4d: 8 CPU, 0 GPU)`, comma-separated."""
    return ", ".join(f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]}: {n['Resources'].get('CPU', 0):g} CPU, "
                     f"{n['Resources'].get('GPU', 0):g} GPU)" for n in nodes) or "none"


class RayWorkerGroup(WorkerGroup):
    """N Ray actors, one torch.distributed rank each (gloo on CPU, NCCL on GPU), FSDP2-sharded."""

    def __init__(self, cfg, model_path: str, *, keep_opponent: bool, run_dir: Path):
        import ray  # optional: only a run with more than one rank (or trainer.launcher=ray) needs it
        from omegaconf import OmegaConf

        super().__init__(world_size=world_size_of(cfg))
        self.ray = ray
        self.actors: list = []
        self.placement_group = None
        self.node_ids: list[str] = []  # each rank's Ray node id, in rank order
        self.started_ray = False
        # ray.init replaces the driver's SIGTERM handler with its own (exit 1, stack dumps): keep the caller's, which
        # for the CLI unwinds like Ctrl-C so that shutdown() below runs
        sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        address = cfg.ray.address
        if not address and os.environ.get("RAY_ADDRESS"):  # inside `ray job submit`: join the job's cluster
            log.info("ray.address is null but RAY_ADDRESS=%s is set (a Ray job): joining that cluster",
                     os.environ["RAY_ADDRESS"])
            address = "auto"
        self.joined_cluster = bool(address)
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=True)
            else:  # a private local cluster on loopback: no token auth files in the home directory
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")
                ray.init(num_cpus=max(os.cpu_count() or 1, self.world_size), _temp_dir=self._temp_dir(run_dir),
                         include_dashboard=False, log_to_driver=True)
            self.started_ray = True
        if callable(sigterm):
            signal.signal(signal.SIGTERM, sigterm)
        try:
            self._check_resources(cfg)
            self._place(cfg)
            env = {k: v for k, v in os.environ.items() if k.startswith("SPINLM_")}
            per_node, gpus = ranks_per_node(cfg), 1 if cfg.trainer.n_gpus_per_node > 0 else 0
            actor = ray.remote(RankActor)
            self.actors = [actor.options(num_cpus=1, num_gpus=gpus, scheduling_strategy=self._bundle(r // per_node))
                           .remote({**env, "SPINLM_RANK": str(r)}) for r in range(self.world_size)]
            nodes = self._gather([a.node_info.remote() for a in self.actors])
            self.node_ids = [node_id for node_id, _ in nodes]
            self._log_placement(cfg, nodes)
            # the group meets at rank 0's node, which need not be the driver's; a private cluster stays on loopback
            addr = nodes[0][1] if self.joined_cluster else "127.0.0.1"
            port = self._gather([self.actors[0].free_port.remote()])[0]
            container = OmegaConf.to_container(cfg, resolve=True)
            # wait until every rank has joined the group and loaded the model
            self._gather([a.join.remote(container, model_path, keep_opponent, r, self.world_size, addr, port)
                          for r, a in enumerate(self.actors)])
        except BaseException:
            self.shutdown()
            raise

    def _bundle(self, index: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=index)

    def _place(self, cfg) -> None:
        """Reserve one bundle per node, each on a different node; fail at once when the cluster has too few nodes
        that could hold one, and after PLACEMENT_TIMEOUT_S when it cannot place them for another reason."""
        from ray.util.placement_group import placement_group

        nnodes, per_node = cfg.trainer.nnodes, ranks_per_node(cfg)
        gpu = cfg.trainer.n_gpus_per_node > 0
        bundle = {"CPU": per_node, "GPU": per_node} if gpu else {"CPU": per_node}
        need = f"{nnodes} Ray node(s) with {per_node} {'GPU' if gpu else 'CPU'} rank(s) each (bundle {bundle})"
        alive = [n for n in self.ray.nodes() if n["Alive"]]
        fit = [n for n in alive if all(n["Resources"].get(k, 0) >= v for k, v in bundle.items())]
        if len(fit) < nnodes:
            raise UserError(f"trainer.nnodes={nnodes}: the ranks need {need}, but the Ray cluster has "
                            f"{len(alive)} alive node(s), {len(fit)} of them big enough: {describe_nodes(alive)}"
                            + ("" if self.joined_cluster else "; several nodes need a cluster: set ray.address"))
        self.placement_group = placement_group([bundle] * nnodes, strategy="STRICT_SPREAD" if nnodes > 1 else "PACK")
        ready, _ = self.ray.wait([self.placement_group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:  # shutdown() removes the placement group
            raise UserError(f"trainer.nnodes={nnodes}: the Ray cluster did not place {need} within "
                            f"{PLACEMENT_TIMEOUT_S:.0f} s (other jobs may hold the resources); its nodes: "
                            f"{describe_nodes(alive)}")

    def _log_placement(self, cfg, nodes: list[tuple[str, str]]) -> None:
        by_node: dict[tuple[str, str], list[int]] = {}
        for rank, node in enumerate(nodes):
            by_node.setdefault(node, []).append(rank)
        log.info("Ray placement (trainer.nnodes=%d): %s", cfg.trainer.nnodes,
                 "; ".join(f"ranks {ranks} on node {node_id} at {ip}" for (node_id, ip), ranks in by_node.items()))

    @staticmethod
    def _temp_dir(run_dir: Path) -> str:
        # Ray puts unix sockets under its temp dir, and socket paths must stay under ~107 bytes
        wanted = Path(run_dir).resolve() / "ray"
        if len(str(wanted)) <= 40:
            wanted.mkdir(parents=True, exist_ok=True)
            return str(wanted)
        return tempfile.mkdtemp(prefix="spinlm-ray-")

    def _check_resources(self, cfg) -> None:
        have = self.ray.cluster_resources()
        need_gpu = self.world_size if cfg.trainer.n_gpus_per_node > 0 else 0
        need_cpu = 0 if need_gpu else self.world_size
        if need_gpu > have.get("GPU", 0):
            raise UserError(f"trainer.nnodes x trainer.n_gpus_per_node = {need_gpu} GPUs requested, but the Ray cluster "
                            f"has {int(have.get('GPU', 0))}")
        if need_cpu > have.get("CPU", 0):
            how = (f"trainer.nnodes x trainer.cpu_workers = {cfg.trainer.nnodes} x {cfg.trainer.cpu_workers} = "
                   f"{need_cpu}" if cfg.trainer.nnodes > 1 else f"trainer.cpu_workers={need_cpu}")
            raise UserError(f"{how} CPU ranks requested, but the Ray cluster has {int(have.get('CPU', 0))} CPUs")

    def _gather(self, refs: list) -> list:
        """Results in rank order. Waits on whichever rank finishes first, so a dead rank is reported at once even
        while the others still wait for it inside a collective."""
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, object] = {}
        while pending:
            (ref,), _ = self.ray.wait(list(pending), num_returns=1)
            rank = pending.pop(ref)
            try:
                results[rank] = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as exc:
                raise UserError(f"rank {rank} (Ray actor) died ({exc.__class__.__name__}); the run stops here and the last "
                                "complete checkpoint is kept. The rank's own log is in the Ray session logs") from exc
            except self.ray.exceptions.RayTaskError as exc:
                raise UserError(f"rank {rank} failed:\n{exc}") from exc
        return [results[r] for r in range(len(refs))]

    def _each(self, method: Callable[..., Any], per_rank_args: list[tuple], **kwargs) -> list:
        name = method.__name__
        if getattr(PolicyWorker, name, None) is not method:  # the actor looks the name up on its PolicyWorker
            raise TypeError(f"{method!r} is not a PolicyWorker method")
        return self._gather([a.call.remote(name, *args, **kwargs) for a, args in zip(self.actors, per_rank_args)])

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self.placement_group is not None:  # on a shared cluster its reserved resources go back at once
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()


def make_worker_group(cfg, model_path: str, *, keep_opponent: bool, run_dir: Path) -> WorkerGroup:
    launcher = cfg.trainer.launcher
    if launcher == "auto":
        launcher = "ray" if world_size_of(cfg) > 1 else "local"
    if launcher == "local":
        if world_size_of(cfg) > 1:
            raise UserError(f"trainer.launcher=local runs one rank, but {world_size_of(cfg)} were requested "
                            "(trainer.nnodes x trainer.cpu_workers / trainer.nnodes x trainer.n_gpus_per_node); "
                            "use trainer.launcher=ray")
        return LocalWorkerGroup(cfg, model_path, keep_opponent=keep_opponent)
    return RayWorkerGroup(cfg, model_path, keep_opponent=keep_opponent, run_dir=run_dir)
