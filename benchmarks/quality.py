"""Does self-play beat more SFT on the bundled task? The SPIN paper's table (Tables 4/5) at laptop scale.

From one weak SFT checkpoint (`spinlm task build`), every method runs `preset=tiny` (512 prompts per round, batch 32,
history_rounds 1, a fresh AdamW + linear schedule per round) with only the listed overrides changed, 3 seeds each,
and reports held-out greedy exact match and pass@4 (4 samples at temperature 1) on 200 val prompts per round:

  (a) SPIN at the paper's settings      beta 0.1, no guard
  (b) SPIN + DPOP guard + SFT term      the demo's settings (preset=tiny)
  (c) online DPO with the GSM8K reward  4 samples per prompt, best vs worst, the same guard and SFT term
  (d) continued SFT                     the same prompts, ground truths, steps, batch and lr as (b), NLL only

then the exploration (2 rounds each, to fit the hour): prompts the SFT model saw vs unseen ones, no data history,
beta per round, no learning-rate decay, a 2.2x larger model, and more rounds (rounds 4-5 of (b)). Each run's result is cached in the --json
file, so an interrupted table resumes where it stopped (--fresh starts over). Writes benchmarks/results/quality.md
(RESULTS.md, written by benchmarks/plateau_study.py, embeds it as its earlier study) and the plot.

    .venv/bin/python benchmarks/quality.py            # the whole table (about an hour on 2 cores)
    .venv/bin/python benchmarks/quality.py --quick    # 1 seed, 1 round, 2 methods: checks the script end to end
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
GUARD = ["algorithm.beta=1.0", "algorithm.dpop_lambda=5.0", "algorithm.sft_weight=1.0", "actor.lr=2e-4"]  # = preset=tiny
SFT_ONLY = ["algorithm.loss_type=sft", "algorithm.sft_weight=1.0", "algorithm.dpop_lambda=0", "actor.lr=2e-4",
            "algorithm.drop_identical_pairs=false"]
LARGE_MODEL = dict(hidden_size=192, num_layers=4, num_heads=4, intermediate_size=576)  # 2.0M parameters vs 0.9M

# name -> (table, rounds, task, train prompts, overrides). Prompts: "train" = the preset's 2000 (25% seen in SFT),
# "seen" = the 500 SFT prompts (the paper's setting: SPIN reuses the SFT data), "unseen" = the other 1500.
METHODS = {
    "(a) SPIN, paper settings (beta 0.1)": ("main", 3, "tiny", "train",
                                            ["algorithm.beta=0.1", "algorithm.dpop_lambda=0", "algorithm.sft_weight=0",
                                             "actor.lr=5e-5"]),
    "(b) SPIN + DPOP + SFT term (demo)": ("main", 5, "tiny", "train", GUARD),
    "(c) online DPO, GSM8K reward, n=4": ("main", 3, "tiny", "train",
                                          [*GUARD, "algorithm.mode=online_dpo", "rollout.n=4",
                                           "algorithm.ref_update_every=16"]),
    "(d) continued SFT, same data and steps": ("main", 3, "tiny", "train", SFT_ONLY),
    "(b) on the 500 SFT prompts": ("explore", 2, "tiny", "seen", GUARD),
    "(b) on 1500 unseen prompts": ("explore", 2, "tiny", "unseen", GUARD),
    "(b) without data history": ("explore", 2, "tiny", "train", [*GUARD, "algorithm.history_rounds=0"]),
    "(b) with beta 1 then 5": ("explore", 2, "tiny", "train", [*GUARD, "algorithm.beta=[1.0,5.0]"]),
    "(b) with a constant learning rate": ("explore", 2, "tiny", "train", [*GUARD, "actor.lr_scheduler=constant"]),
    "(b) on a 2.0M-parameter model": ("explore", 2, "large", "train", GUARD),
    "(d) on a 2.0M-parameter model": ("explore", 2, "large", "train", SFT_ONLY),
}


def build_tasks(work: Path, large: bool) -> dict[str, Path]:
    """The tiny task (the default cache, shared with ./run_spin.sh), the larger model's build when asked, and the
    seen / unseen prompt files. Cached: a second call only checks them."""
    from spinlm.tasks.build import build_tiny_task

    tasks = {"tiny": build_tiny_task(REPO / ".cache" / "tiny_task")}
    if large:
        tasks["large"] = build_tiny_task(REPO / ".cache" / "quality_large_task", model_kwargs=LARGE_MODEL)
    import pyarrow.parquet as pq

    train = pq.read_table(tasks["tiny"] / "train.parquet")
    n_sft = pq.read_metadata(tasks["tiny"] / "sft.parquet").num_rows  # the first n_sft train rows (tasks/build.py)
    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(train.slice(0, n_sft), work / "seen.parquet")
    pq.write_table(train.slice(n_sft), work / "unseen.parquet")
    return tasks


def run_one(name: str, seed: int, rounds: int, tasks: dict[str, Path], work: Path, pass_k: int) -> dict:
    _, _, task, prompts, overrides = METHODS[name]
    out = work / "runs" / f"{list(METHODS).index(name)}-s{seed}"
    train_file = tasks[task] / "train.parquet" if prompts == "train" else work / f"{prompts}.parquet"
    cmd = [sys.executable, "-m", "spinlm.cli", "train", "preset=tiny", f"model.path={tasks[task] / 'sft_model'}",
           f"data.train_files={train_file}", f"data.val_files={tasks[task] / 'val.parquet'}",
           f"trainer.rounds={rounds}", f"trainer.seed={seed}", f"trainer.output_dir={out}", "trainer.resume=disable",
           f"trainer.val_pass_k={pass_k}", "trainer.logger=[jsonl]", "trainer.keep_last_checkpoints=1", *overrides]
    shutil.rmtree(out, ignore_errors=True)  # a run cut short earlier: its result was never recorded, so redo it
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}, seed {seed} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = sorted((r for r in rows if r["kind"] == "val"), key=lambda r: r["round"])
    train = [r for r in rows if r["kind"] == "train"]
    return {"acc": [r["val/acc"] for r in val], f"pass@{pass_k}": [r[f"val/pass@{pass_k}"] for r in val],
            "steps": [sum(1 for r in train if r["round"] == t) for t in range(1, rounds + 1)],
            "chosen_drift": [r["train/chosen_drift"] for r in sorted((r for r in rows if r["kind"] == "health"
                                                                              and "train/chosen_drift" in r),
                                                                      key=lambda r: r["round"])],
            "seconds": time.time() - start}


def mean_sd(values: list[float], scale: float = 100) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.1f} ± {scale * sd:.1f}"


def table(results: dict, names: list[str], key: str, rounds: int) -> list[str]:
    """Rows of mean ± std over seeds per round; `chosen_drift` (nats, no SFT-start column) is not a percentage."""
    first = 1 if key == "chosen_drift" else 0
    lines = ["| method | steps per round | " + " | ".join((["SFT start"] if not first else [])
                                                         + [f"round {t}" for t in range(1, rounds + 1)]) + " |",
             "|---|---|" + "---|" * (rounds + 1 - first)]
    for name in names:
        runs = [r for r in results.get(name, {}).values() if all(v is not None for v in r.get(key, [None]))]
        if not runs:
            continue
        cells = [mean_sd([r[key][t] for r in runs], 1 if first else 100) if t < len(runs[0][key]) else ""
                 for t in range(rounds + 1 - first)]
        steps = "/".join(str(round(statistics.mean(r["steps"][t] for r in runs))) for t in range(len(runs[0]["steps"])))
        lines.append(f"| {name} | {steps} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict, names: list[str], key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in names:
        runs = list(results.get(name, {}).values())
        if not runs:
            continue
        n = len(runs[0][key])
        means = [100 * statistics.mean(r[key][t] for r in runs) for t in range(n)]
        sds = [100 * statistics.stdev([r[key][t] for r in runs]) if len(runs) > 1 else 0.0 for t in range(n)]
        ax.errorbar(range(n), means, yerr=sds, marker="o", capsize=3, label=name)
    ax.set_xlabel("round (0 = SFT warm start)")
    ax.set_ylabel("held-out exact match, greedy (%)")
    ax.set_title("SPIN vs continued SFT on the tiny task (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="names of METHODS to run (default: all)")
    p.add_argument("--quick", action="store_true", help="1 seed, 1 round, methods (b) and (d), results to /tmp")
    p.add_argument("--pass-k", type=int, default=4)
    p.add_argument("--work", default=str(REPO / "outputs" / "quality"), help="run directories (not committed)")
    p.add_argument("--json", default=str(RESULTS / "quality.json"), help="per-run results; reruns skip runs found here")
    p.add_argument("--fresh", action="store_true", help="ignore the results already in --json")
    args = p.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    names = [n for n in METHODS if n in args.methods]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from: {list(METHODS)}")
    out_md, out_png, json_path = RESULTS / "quality.md", RESULTS / "quality.png", Path(args.json)
    if args.quick:
        args.seeds, names = args.seeds[:1], [n for n in METHODS if n.startswith(("(b) SPIN", "(d) continued"))]
        out_md, out_png, json_path = Path("/tmp/quality_quick.md"), Path("/tmp/quality_quick.png"), Path("/tmp/quality_quick.json")
        args.fresh, args.work = True, "/tmp/quality_quick"
    work = Path(args.work)
    tasks = build_tasks(work, large=any(METHODS[n][2] == "large" for n in names))
    results = {} if args.fresh or not json_path.exists() else json.loads(json_path.read_text())["runs"]
    for name in names:
        rounds = 1 if args.quick else METHODS[name][1]
        for seed in args.seeds:
            if str(seed) in results.get(name, {}):
                continue
            r = run_one(name, seed, rounds, tasks, work, args.pass_k)
            results.setdefault(name, {})[str(seed)] = r
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"runs": results}, indent=1))  # after every run: an interruption loses one
            print(f"{name} seed {seed}: acc {' '.join(f'{100 * a:.1f}' for a in r['acc'])}  "
                  f"pass@{args.pass_k} {' '.join(f'{100 * a:.1f}' for a in r[f'pass@{args.pass_k}'])}  "
                  f"({r['seconds']:.0f} s)", flush=True)
    wall = sum(r["seconds"] for runs in results.values() for r in runs.values())
    main_names = [n for n in names if METHODS[n][0] == "main"]
    explore = [n for n in names if METHODS[n][0] == "explore"]
    rounds = max((METHODS[n][1] for n in names), default=1) if not args.quick else 1
    key = f"pass@{args.pass_k}"
    plot(results, main_names, "acc", out_png)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    import torch

    md = [
        "# Results: does self-play beat more SFT on the bundled task?",
        "",
        f"Made by `.venv/bin/python benchmarks/quality.py` (seeds {' '.join(map(str, args.seeds))}) on {cpu}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}; **{wall / 60:.0f} min** of runs in all (the sum of every "
        f"run's wall time; the task builds come on top: about 40 s for the tiny one, about 3 min for the larger model). "
        "Raw per-run numbers: `benchmarks/results/quality.json`; plot: `benchmarks/results/quality.png`.",
        "",
        "Held-out exact match (%) on 200 val prompts, mean ± std over seeds; round 0 is the SFT warm start (one "
        "checkpoint, so its std is 0). One 200-prompt evaluation at p ≈ 0.11 has a binomial standard error of "
        "about 2.2 points; differences under about 3 points are noise. Steps per round: optimizer steps (mean over "
        "seeds); SPIN's rounds 2+ train on their own pairs and the previous round's (history_rounds 1).",
        "",
        "## Greedy exact match",
        "",
        *table(results, main_names, "acc", rounds),
        "",
        f"## {key} (4 samples at temperature 1)",
        "",
        *table(results, main_names, key, rounds),
        "",
        "![val accuracy per round](benchmarks/results/quality.png)",
        "",
        "## Chosen drift: what the collapse warning watches",
        "",
        "Mean over the round's steps of (policy − opponent) log-prob of the chosen response, in nats; the trainer warns "
        "when it falls below −trainer.collapse_threshold (1.0) while margins grow.",
        "",
        *table(results, main_names, "chosen_drift", rounds),
        "",
        "## Exploration (greedy exact match)",
        "",
        *table(results, explore, "acc", 2),
        "",
        f"## Exploration ({key})",
        "",
        *table(results, explore, key, 2),
        "",
    ]
    reading = REPO / "benchmarks" / "results" / "quality_reading.md"
    if reading.exists() and not args.quick:  # the written interpretation, kept across regenerations
        md += [reading.read_text().rstrip(), ""]
    out_md.write_text("\n".join(md))
    print(f"wrote {out_md} and {out_png} ({wall / 60:.1f} min of runs)")


if __name__ == "__main__":
    main()
