"""How the preference update's cost grows: spinlm vs TRL's DPOTrainer over response length, model size and rounds.

Every point runs bench_update.py's `spinlm` and `trl` variants (each in its own subprocess, so peak RSS, ru_maxrss,
is per point and variant): a randomly initialised Llama built from a config, the same random token pairs on both
sides, fp32, no gradient checkpointing, sigmoid loss, beta 0.1, AdamW lr 1e-5. spinlm precomputes the reference
log-probs once and times `DataParallelActor.preference_step` on packed sequences (chunked lm-head: no
[batch, seq, vocab] logits); TRL runs DPOTrainer with its default reference copy, whose forward is in every step.
Every point: 1 warm-up step, then the median of `--measured` steps (5). FLOPs (in --json) are bench_update's: 6 N per
trained token (8 N with TRL's in-step reference forward) plus causal attention, 6 L^2 d per sequence and layer.

Axes (prompts 128 tokens; chosen and rejected both exactly the response length):
- length: responses 256 ... 4096 tokens on a ~12M model (vocab 32000, hidden 256, 4 layers, tied), 1 pair per step.
  Reported: memory per 1k trained tokens between consecutive lengths, and tokens/s longest / shortest, per side.
- size: ~1M (bench_update's tiny), ~6M (the length axis' model with vocab 10240), ~25M (bench_update's 25m) and
  SmolLM2-135M's shape as a random Llama (vocab 49152, hidden 576, 30 layers, 9 heads, 3 kv heads); responses 512,
  2 pairs a step.
- rounds: spin with algorithm.history_rounds=3 trains round r on the pairs of r rounds (r <= 4), so rounds 1..4 are
  the same 4-pair steps over 4, 8, 12, 16 steps on the ~6M model, responses 256. Reported: tokens/s and peak RSS per
  round (expected flat) and the round's update time (expected linear): its steps' measured times, plus spinlm's
  reference precompute for the round's pairs (TRL's reference forward is inside its steps; dataset preparation is
  not counted on either side).

A failing point (non-zero exit, out of memory) is recorded as failed with its reason and the sweep carries on;
children run under an address-space limit (--mem-limit-gb, default 90% of the memory available at the start) so
running out of memory is an allocation error in that child, not the kernel's OOM killer picking a process.

    .venv/bin/python benchmarks/sweep_update.py [--axes length,size,rounds] [--lengths 256,...,4096] [--measured 5]
        [--json out.json] [--plot benchmarks/results/sweep_update.png | --no-plot]
    .venv/bin/python benchmarks/sweep_update.py --quick    # smoke test, about 2 min: 2 short points per axis
    .venv/bin/python benchmarks/sweep_update.py --plot-from out.json [--plot PATH]   # redraw, no rerun

The full sweep takes about half an hour on 2 cores; its longest points (length 4096, the 135M model) take 3 to 7
minutes each.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_update import MODELS, machine, run_child, summarise  # noqa: E402  (sets OMP_WAIT_POLICY first)

AXES = ["length", "size", "rounds"]
VARIANTS = ["spinlm", "trl"]
PROMPT = 128
MID = dict(vocab=32000, hidden=256, layers=4, heads=4, inter=768, tie=True)  # ~12M, the length axis' model
SIZES = {
    "1m": dict(vocab=512, hidden=128, layers=4, heads=4, inter=384, tie=False),  # bench_update's tiny
    "6m": dict(vocab=10240, hidden=256, layers=4, heads=4, inter=768, tie=True),
    "25m": {k: MODELS["25m"][k] for k in ("vocab", "hidden", "layers", "heads", "inter", "tie")},
    "135m": dict(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, inter=1536, tie=True),  # SmolLM2-135M's
}
LENGTHS = [256, 512, 1024, 2048, 4096]
ROUNDS = [1, 2, 3, 4]  # history_rounds=3: round r trains on the pairs of r rounds
ROUND_BASE_STEPS = 4  # one round's own pairs, in steps of 4 pairs
DEFAULT_PLOT = Path(__file__).resolve().parent / "results" / "sweep_update.png"


def n_params(shape: dict) -> int:
    h, kv, layers = shape["hidden"], shape.get("kv_heads", shape["heads"]), shape["layers"]
    attn = 2 * h * h + 2 * h * kv * (h // shape["heads"])  # q, o; k, v
    return layers * (attn + 3 * h * shape["inter"] + 2 * h) + h + shape["vocab"] * h * (1 if shape["tie"] else 2)


def points(axes: list[str], quick: bool, measured: int, lengths: list[int] | None = None) -> list[dict]:
    """axis, value, label, spec (a bench_update MODELS entry) and, on the rounds axis, the round's steps. --quick:
    2 points per axis on shorter responses (size 128, rounds 64) and 1-step rounds."""
    def pair(response: int, batch: int) -> dict:
        return dict(prompt=(PROMPT, PROMPT), response=(response, response), batch=batch)

    out = []
    if "length" in axes:
        for n in lengths or ([64, 128] if quick else LENGTHS):
            out.append(dict(axis="length", value=n, label=str(n), spec=dict(MID, **pair(n, 1), steps=1 + measured)))
    if "size" in axes:
        for name in ["1m", "6m"] if quick else SIZES:
            spec = dict(SIZES[name], **pair(128 if quick else 512, 2), steps=1 + measured)
            out.append(dict(axis="size", value=n_params(spec), label=name, spec=spec))
    if "rounds" in axes:
        base = 1 if quick else ROUND_BASE_STEPS
        for r in ROUNDS[:2] if quick else ROUNDS:
            spec = dict(SIZES["6m"], **pair(64 if quick else 256, 4), steps=1 + max(measured, base * r))
            out.append(dict(axis="rounds", value=r, label=str(r), spec=spec, round_steps=base * r))
    return out


def failure(e: Exception) -> str:
    """One line on why a child failed."""
    rc, err = getattr(e, "returncode", None), getattr(e, "stderr", "") or str(e)
    last = next((ln.strip() for ln in reversed(err.splitlines()) if ln.strip()), "")[:300]
    if rc is not None and rc < 0:
        name = signal.Signals(-rc).name
        return f"killed by {name}" + (" (the kernel's OOM killer?)" if name == "SIGKILL" else "") + f": {last}"
    oom = any(s in err for s in ("allocate memory", "MemoryError", "out of memory"))
    return ("out of memory: " if oom else "") + (f"exit {rc}: " if rc is not None else "") + last


def run_point(pt: dict, variant: str, mem_limit: int) -> dict:
    row = dict(axis=pt["axis"], value=pt["value"], label=pt["label"], variant=variant, spec=pt["spec"],
               params=n_params(pt["spec"]), ok=False)
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))  # noqa: E731
    t0 = time.perf_counter()
    try:
        raw = run_child(["--child-spec", json.dumps(pt["spec"]), variant], f"{pt['axis']} {pt['label']} {variant}",
                        preexec_fn=limit)
        row.update(summarise(raw), ok=True, times=raw["times"], ref_precompute_s=raw.get("ref_precompute_s"))
        if "round_steps" in pt:  # the round's own steps; spinlm's reference log-probs for the round's pairs
            k = pt["round_steps"]
            ref = (raw.get("ref_precompute_s") or 0.0) * k / pt["spec"]["steps"]
            row.update(round_steps=k, round_update_s=sum(raw["times"][1:1 + k]) + ref)
    except Exception as e:  # noqa: BLE001  a failed point is a row, never the end of the sweep
        row["reason"] = failure(e)
    row["wall_s"] = time.perf_counter() - t0
    return row


def point_line(r: dict) -> str:
    head = f"{r['axis']:6s} {r['label']:>5s} {r['variant']:6s}"
    if not r["ok"]:
        return f"{head} FAILED after {r['wall_s']:.0f}s: {r['reason']}"
    line = (f"{head} {r['tokens_per_s']:8.0f} tok/s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
            f"median step {r['median_step_s']:7.3f}s  ({r['measured_steps']} measured steps of "
            f"{r['tokens_per_step']:.0f} tokens, {r['flops_per_s'] / 1e9:.1f} GFLOP/s, "
            f"{r['params'] / 1e6:.1f}M params, load {r['load_avg']:.2f}, {r['wall_s']:.0f}s)")
    if "round_update_s" in r:
        line += f"  round update {r['round_update_s']:.1f}s over {r['round_steps']} step(s)"
    return line


def report(rows: list[dict]) -> None:
    """The spinlm / TRL ratios per point, and the growth of each axis per side."""
    by = {(r["axis"], r["value"], r["variant"]): r for r in rows}
    print("\nspinlm / TRL per point (tokens/s ratio: >1 spinlm faster; peak RSS ratio: <1 spinlm smaller):")
    for axis, value, label in dict.fromkeys((r["axis"], r["value"], r["label"]) for r in rows):
        s, t = by.get((axis, value, "spinlm")), by.get((axis, value, "trl"))
        if s and t and s["ok"] and t["ok"]:
            print(f"  {axis:6s} {label:>5s}  tokens/s {s['tokens_per_s'] / t['tokens_per_s']:5.2f}x  "
                  f"peak RSS {s['peak_rss_mb'] / t['peak_rss_mb']:5.2f}x")
        else:
            print(f"  {axis:6s} {label:>5s}  n/a (a side failed or did not run)")
    def ok(axis: str, variant: str) -> list[dict]:
        return sorted((r for r in rows if r["axis"] == axis and r["variant"] == variant and r["ok"]),
                      key=lambda r: r["value"])

    for variant in VARIANTS:
        if len(length := ok("length", variant)) >= 2:
            vocab = length[0]["spec"]["vocab"]
            per_1k = lambda a, b: 1000 * (b["peak_rss_mb"] - a["peak_rss_mb"]) / (  # noqa: E731
                b["tokens_per_step"] - a["tokens_per_step"])
            steps = [f"{a['label']}->{b['label']}: {per_1k(a, b):.0f}" for a, b in zip(length, length[1:])]
            print(f"length {variant}: peak RSS MB per 1k more tokens per step {', '.join(steps)} (one fp32 "
                  f"[tokens, {vocab}] tensor is {4 * vocab * 1000 / 2 ** 20:.0f} MB per 1k tokens); tokens/s "
                  f"{length[-1]['label']} / {length[0]['label']}: "
                  f"{length[-1]['tokens_per_s'] / length[0]['tokens_per_s']:.2f}x")
        if len(rounds := ok("rounds", variant)) >= 2:
            tps, rss = [r["tokens_per_s"] for r in rounds], [r["peak_rss_mb"] for r in rounds]
            print(f"rounds {variant}: tokens/s max/min {max(tps) / min(tps):.2f}x, peak RSS max/min "
                  f"{max(rss) / min(rss):.2f}x; round update time / round {rounds[0]['label']}'s: "
                  + ", ".join(f"{r['label']}: {r['round_update_s'] / rounds[0]['round_update_s']:.2f}x"
                              for r in rounds))


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("sweep_update.py: the plot needs matplotlib (.venv/bin/pip install matplotlib), or pass --no-plot")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """2 rows (tokens/s, peak RSS MB) x one column per axis; spinlm and TRL a line each; failed points left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [a for a in AXES if any(r["axis"] == a for r in rows)]
    fig, grid = plt.subplots(2, len(axes), figsize=(5 * len(axes), 7.5), squeeze=False)
    xlabel = {"length": "response tokens (chosen = rejected; prompt 128)", "size": "parameters",
              "rounds": "round (history_rounds=3: r rounds of pairs)"}
    for col, axis in enumerate(axes):
        for variant, style in zip(VARIANTS, ("o-", "s--")):
            pts = sorted((r for r in rows if r["axis"] == axis and r["variant"] == variant and r["ok"]),
                         key=lambda r: r["value"])
            for row, key in enumerate(("tokens_per_s", "peak_rss_mb")):
                grid[row][col].plot([r["value"] for r in pts], [r[key] for r in pts], style,
                                    label="TRL DPOTrainer" if variant == "trl" else variant)
        labels = sorted({(r["value"], r["label"]) for r in rows if r["axis"] == axis})
        for row, ylabel in enumerate(("tokens/s", "peak RSS MB")):
            ax = grid[row][col]
            if axis != "rounds":
                ax.set_xscale("log")
            ax.set_xticks([v for v, _ in labels], [lb for _, lb in labels])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.set_ylabel(ylabel)
            ax.set_xlabel(xlabel[axis])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        grid[0][col].set_title(axis)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def available_bytes() -> int:
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.startswith("MemAvailable:"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--axes", default=",".join(AXES), help="comma-separated subset of " + ",".join(AXES))
    p.add_argument("--quick", action="store_true", help="smoke test: 2 points per axis, 2 measured steps")
    p.add_argument("--lengths", help="comma-separated response lengths of the length axis (256,...,4096)")
    p.add_argument("--measured", type=int, help="measured steps per point after the warm-up (5; --quick: 2)")
    p.add_argument("--mem-limit-gb", type=float, help="address-space limit per child (90%% of MemAvailable)")
    p.add_argument("--json", help="write the machine and all rows here")
    p.add_argument("--plot", type=Path, help=f"the figure (default {DEFAULT_PLOT}; --quick: sweep_update_quick.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-from", metavar="JSON", help="redraw the figure (and the summary) from a --json file")
    args = p.parse_args()
    args.plot = args.plot or DEFAULT_PLOT.with_stem("sweep_update_quick" if args.quick else "sweep_update")
    if not args.no_plot:
        check_matplotlib()
    if args.plot_from:
        saved = json.load(open(args.plot_from))
        report(saved["rows"])
        if not args.no_plot:
            plot(saved["rows"], args.plot, saved["machine"]["line"])
        return
    axes = args.axes.split(",")
    if unknown := [a for a in axes if a not in AXES]:
        p.error(f"unknown axes {unknown}; axes: {', '.join(AXES)}")
    measured = args.measured or (2 if args.quick else 5)
    mem_limit = int(args.mem_limit_gb * 2 ** 30) if args.mem_limit_gb else int(0.9 * available_bytes())
    host = machine()
    print(host["line"])
    print(f"1 warm-up + {measured} measured steps per point (median), more on the rounds axis where a round has more "
          f"steps; children limited to {mem_limit / 2 ** 30:.1f} GiB address space", flush=True)
    rows, t0 = [], time.perf_counter()
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else None
    for pt in points(axes, args.quick, measured, lengths):
        for variant in VARIANTS:
            rows.append(run_point(pt, variant, mem_limit))
            print(point_line(rows[-1]), flush=True)
    print(f"sweep wall time {time.perf_counter() - t0:.0f}s, load avg at the end {os.getloadavg()[0]:.2f}")
    report(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(machine=host, measured=measured, quick=args.quick, rows=rows), f, indent=1)
    if not args.no_plot:
        plot(rows, args.plot, host["line"])


if __name__ == "__main__":
    main()
