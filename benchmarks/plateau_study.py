"""Does self-play beat more SFT from an SFT *plateau*? The SPIN paper's precondition, at laptop scale.

SPIN's fixed point is the data distribution, so the paper starts from a model already trained to convergence on its
SFT data, where one more SFT epoch no longer helps. benchmarks/quality.py started from a weak warm start (10.5%), where
more SFT is bound to win. This study first trains SFT to its plateau, then compares from that one start, per task
setting in TASKS (an easier distribution and the bundled task's own, both with 2000 SFT rows and plateaus above 90%;
and a data-limited one: 500 SFT rows, whose plateau is in the middle range):

  1. the SFT curve: passes over the SFT split (each `spinlm sft` run continues the previous one), greedy exact match
     on a dev split (rows of train.parquet outside the SFT split) after each; it stops when `patience` passes in a
     row bring no new best, and the best pass by dev accuracy is the plateau start. The held-out test split
     (val.parquet, 1000 prompts) is scored too but never used for a choice.
  2. from the plateau, `spinlm train` on the SFT split's prompts and ground truths (the paper's setting), 3 seeds:
       SPIN guarded          the demo's DPOP guard + SFT term (preset=tiny)
       SPIN unguarded        the paper's settings: beta 0.1, no guard, no SFT term
       online DPO, reward    GSM8K 0/1 reward, rollout.n=8, correct-vs-incorrect pairs only (min_reward_margin 1),
                             SFT term on correct chosen only, reference kept at the plateau model
       (data-limited task only) the same online DPO on new prompts given with their final answer only
       continued SFT         the same prompts, ground truths, steps, batch and lr as SPIN guarded, NLL only
  3. every round's checkpoint scored per held-out prompt (greedy), so each method is compared with continued SFT
     *paired*: per prompt and seed, correct(method) - correct(continued SFT).

Each run's result is one JSON file under benchmarks/results/<task name>/ (raw: per-prompt correctness included), so
an interrupted study resumes where it stopped (runs with a result file are skipped). Checkpoints and task builds stay
under .cache/ and outputs/ (git-ignored). Writes RESULTS.md (with benchmarks/results/plateau_reading.md, the written
interpretation, and benchmarks/results/quality.md, the earlier weak-start study) and the plots to benchmarks/results/.

    .venv/bin/python benchmarks/plateau_study.py                  # all tasks (about 1.5 h on 2 quiet cores)
    .venv/bin/python benchmarks/plateau_study.py --tasks easy     # one task
    .venv/bin/python benchmarks/plateau_study.py --markdown-only  # RESULTS.md and plots from the results on disk
    .venv/bin/python benchmarks/plateau_study.py --quick          # the same pipeline at toy scale (~3 min), to /tmp
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import GUARD, SFT_ONLY  # noqa: E402  (the settings of the earlier study, shared on purpose)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LENGTHS = ["data.max_prompt_length=96", "data.max_response_length=64"]  # preset=tiny's lengths

# Self-play's one advantage over SFT: the reward needs a prompt's final answer, not a worked response. This run trains
# on train rows outside the SFT and dev splits, written without their responses (answer_only.parquet), so it uses
# more prompts than the others (same count per round, same steps): for tasks with `answer_only_prompts`.
ANSWER_ONLY = "online DPO, 0/1 reward, n=8, on new answer-only prompts"
# The tasks and model: see RESULTS.md for why these. `pass_steps`: one pass of SFT (batch 16) over the SFT split
# (easy: 125 steps = 1 epoch of 2000 rows; bundled: 250 steps = 2 epochs). `name`: the folder names of a task's
# results (benchmarks/results/<name>/, plots <name>_*.png), build (.cache/<dir>) and runs (outputs/<dir>).
MODEL = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384)  # tiny_model.py's default, 0.9M
TASKS = {
    "easy": dict(
        name="plateau", dir="plateau_study", title="1-2 operations, numbers up to 20",
        task=dict(n_train=3000, n_val=1000, n_sft=2000, min_steps=1, max_steps=2, max_number=20, model_kwargs=MODEL),
        pass_steps=125, max_passes=32, patience=2, n_dev=500, prompts_per_round=512, rounds=2, seeds=[1, 2, 3]),
    "bundled": dict(
        name="plateau_bundled", dir="plateau_study_bundled",
        title="1-3 operations, numbers up to 20 (the bundled task's distribution)",
        task=dict(n_train=3000, n_val=1000, n_sft=2000, min_steps=1, max_steps=3, max_number=20, model_kwargs=MODEL),
        pass_steps=250, max_passes=24, patience=2, n_dev=500, prompts_per_round=512, rounds=2, seeds=[1, 2, 3]),
    "small_sft": dict(
        name="plateau_small_sft", dir="plateau_study_small_sft",
        title="a data-limited plateau: 500 SFT rows, 1-2 operations, numbers up to 20",
        task=dict(n_train=3000, n_val=1000, n_sft=500, min_steps=1, max_steps=2, max_number=20, model_kwargs=MODEL),
        pass_steps=125, max_passes=48, patience=8, n_dev=500, prompts_per_round=500, rounds=6, seeds=[1, 2, 3],
        answer_only_prompts=True,
        # Found on the 1000 held-out prompts (+1.1 +- 0.9 points after round 6), then tested once on fresh prompts:
        confirm=dict(method=ANSWER_ONLY, n_prompts=5000)),
}
QUICK = dict(
    name="plateau_quick", dir="plateau_quick", title="toy scale (--quick)",
    task=dict(n_train=700, n_val=200, n_sft=300, min_steps=1, max_steps=1, max_number=9,
              model_kwargs=dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192)),
    pass_steps=40, max_passes=3, patience=1, n_dev=100, prompts_per_round=64, rounds=1, seeds=[1])

PAPER = ["algorithm.beta=0.1", "algorithm.dpop_lambda=0", "algorithm.sft_weight=0", "actor.lr=5e-5"]
REWARD_RECIPE = ["algorithm.mode=online_dpo", "rollout.n=8", "algorithm.min_reward_margin=1",
                 "algorithm.sft_on_correct_only=true", "algorithm.reference=initial"]
BASELINE = "continued SFT (same data and steps)"
METHODS = {  # name -> overrides on top of preset=tiny (online DPO also gets ref_update_every: see run_method)
    "SPIN guarded (DPOP + SFT term)": GUARD,
    "SPIN unguarded (paper: beta 0.1)": PAPER,
    "online DPO, 0/1 reward, n=8": [*GUARD, *REWARD_RECIPE],
    BASELINE: SFT_ONLY,
}
METHODS[ANSWER_ONLY] = METHODS["online DPO, 0/1 reward, n=8"]


def task_methods(settings: dict) -> list[str]:
    return [n for n in METHODS if n != ANSWER_ONLY or settings.get("answer_only_prompts")]


# ------------------------------------------------------------------------------------------------ task and splits

def build_task(cache: Path, settings: dict) -> dict[str, Path]:
    """The task build (its own SFT is pass 1 of the curve) plus dev.parquet: the last n_dev train rows, outside the
    SFT split and never trained on; and answer_only.parquet: the train rows between the SFT split (the first n_sft)
    and dev, with the prompt and final answer only (verl format: no `messages`, no worked solution). Cached: a
    second call only checks the build."""
    import pyarrow.parquet as pq

    from spinlm.tasks.build import build_tiny_task

    task = build_tiny_task(cache / "task", sft_steps=settings["pass_steps"], **settings["task"])
    train = pq.read_table(task / "train.parquet")
    dev, answer_only = cache / "dev.parquet", cache / "answer_only.parquet"
    if not dev.exists():
        pq.write_table(train.slice(train.num_rows - settings["n_dev"]), dev)
    if not answer_only.exists():
        n_sft = settings["task"]["n_sft"]
        rows = train.slice(n_sft, train.num_rows - settings["n_dev"] - n_sft)
        pq.write_table(rows.select(["data_source", "prompt", "ability", "reward_model"]), answer_only)
    return {"task": task, "sft": task / "sft.parquet", "dev": dev, "test": task / "val.parquet",
            "answer_only": answer_only}


def greedy_answers(model_dir: Path, test_file: Path, lengths: list[str] = LENGTHS) -> tuple[list, list[str]]:
    """Greedy answers of the model in `model_dir` to every prompt of `test_file` (the trainer's val prompts, its
    chat template), in file order: (items, decoded texts)."""
    import torch

    from spinlm.config import load_config
    from spinlm.data.items import load_val_items
    from spinlm.modeling import eos_ids_of, load_model, load_tokenizer
    from spinlm.rollout.hf_rollout import SamplingParams, generate

    cfg = load_config([f"model.path={model_dir}", f"data.val_files={test_file}", *lengths])
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype="float32", attn_implementation=cfg.model.attn_implementation,
                       device=torch.device("cpu"))
    model.eval()
    items = load_val_items(cfg.data, tokenizer)
    rollout = generate(model, [it.prompt_ids for it in items],
                       SamplingParams(max_new_tokens=cfg.data.max_response_length, greedy=True),
                       pad_id=tokenizer.pad_token_id, eos_ids=eos_ids_of(tokenizer, model), batch_size=64)
    return items, tokenizer.batch_decode([r[0] for r in rollout.responses], skip_special_tokens=True)


def correct_bits(items: list, texts: list[str], gsm8k_method: str = "strict") -> str:
    """Each answer scored by the GSM8K rule reward as the trainer's val/acc is: a string of '0'/'1'."""
    from spinlm.config import load_config
    from spinlm.rewards import get_reward_fn, score_responses

    reward_fn = get_reward_fn(load_config([f"reward.gsm8k_method={gsm8k_method}"]).reward)
    return "".join("1" if s > 0 else "0" for s in score_responses(reward_fn, items, texts))


def per_prompt_correct(model_dir: Path, test_file: Path) -> str:
    """Greedy exact match per prompt of `test_file` (strict GSM8K rule, the trainer's val/acc)."""
    return correct_bits(*greedy_answers(model_dir, test_file))


def accuracy(bits: str) -> float:
    return bits.count("1") / len(bits)


def save(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.rename(path)  # a result file exists only when complete: resuming trusts it


# ----------------------------------------------------------------------------------------------------- SFT curve

def sft_curve(paths: dict[str, Path], settings: dict, work: Path, results: Path) -> list[dict]:
    """Pass 1 is the task build's SFT; pass k+1 is one more `spinlm sft` pass (settings["pass_steps"] steps, the
    build's recipe: batch 16, lr 1e-3, warmup + cosine) from pass k. Stops after `patience` passes without a new
    best dev accuracy. Each pass: {"pass", "steps", "model", "dev", "test", "seconds"}, cached in sft_curve.json."""
    from spinlm.config import load_config
    from spinlm.sft import run_sft_from_config

    cache_file = results / "sft_curve.json"
    curve = json.loads(cache_file.read_text())["passes"] if cache_file.exists() else []
    info = json.loads((paths["task"] / "build_info.json").read_text())
    while True:
        if not curve:
            model, seconds = paths["task"] / "sft_model", info["sft"]["seconds"]
        else:
            best = max(range(len(curve)), key=lambda i: curve[i]["dev_acc"])
            if len(curve) - 1 - best >= settings["patience"] or len(curve) >= settings["max_passes"]:
                save(cache_file, {"passes": curve, "n_params": info["n_params"]})  # the model size, for the write-up
                return curve
            model = work / "sft" / f"pass{len(curve) + 1}"
            shutil.rmtree(model, ignore_errors=True)  # a pass cut short earlier: never recorded, so redo it
            start = time.time()
            cfg = load_config([f"model.path={curve[-1]['model']}", f"data.train_files={paths['sft']}",
                               f"sft.steps={settings['pass_steps']}", f"sft.output_dir={model}",
                               f"trainer.seed={len(curve) + 1}", "trainer.device=cpu", *LENGTHS])
            run_sft_from_config(cfg)
            seconds = time.time() - start
        dev, test = per_prompt_correct(model, paths["dev"]), per_prompt_correct(model, paths["test"])
        curve.append({"pass": len(curve) + 1, "steps": (len(curve) + 1) * settings["pass_steps"], "model": str(model),
                      "dev_acc": accuracy(dev), "test_acc": accuracy(test), "test": test, "seconds": seconds})
        save(cache_file, {"passes": curve, "n_params": info["n_params"]})
        print(f"SFT pass {len(curve)}: dev {100 * accuracy(dev):.1f}  test {100 * accuracy(test):.1f}  "
              f"({seconds:.0f} s)", flush=True)


# ------------------------------------------------------------------------------------------- methods from the plateau

def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def pair_counts(rows: list[dict], rounds: int) -> list[int]:
    """Preference pairs trained on per round (rollout/pairs summed over the round's rollouts; SPIN drops a sample
    identical to the ground truth, online DPO a prompt whose samples are all right or all wrong)."""
    return [int(sum(r.get("rollout/pairs", 0) for r in rows if r["kind"] == "rollout" and r["round"] == t))
            for t in range(1, rounds + 1)]


def chosen_drifts(rows: list[dict], rounds: int) -> list[float | None]:
    """train/chosen_drift per round (online DPO logs a second health row per round, with the tie share)."""
    return [next((r["train/chosen_drift"] for r in rows
                  if r["kind"] == "health" and r["round"] == t and "train/chosen_drift" in r), None)
            for t in range(1, rounds + 1)]


def run_method(name: str, seed: int, start: Path, paths: dict[str, Path], settings: dict, work: Path,
               results: Path) -> dict:
    """One `spinlm train` run from the plateau start on the SFT split's prompts (ANSWER_ONLY: on answer_only.parquet);
    every round's checkpoint scored per held-out prompt. Skipped when its result file exists (resume)."""
    result_file = results / "runs" / f"{slug(name)}-s{seed}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out = work / "runs" / f"{slug(name)}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a run cut short earlier: its result was never recorded, so redo it
    ppr, rounds = settings["prompts_per_round"], settings["rounds"]
    overrides = list(METHODS[name])
    if "algorithm.mode=online_dpo" in overrides:  # a round = as many prompts as the other methods' rounds
        overrides.append(f"algorithm.ref_update_every={ppr // 32}")
    cmd = [sys.executable, "-m", "spinlm.cli", "train", "preset=tiny", f"model.path={start}",
           f"data.train_files={paths['answer_only' if name == ANSWER_ONLY else 'sft']}",
           f"data.val_files={paths['dev']}", "data.val_max_samples=null",
           f"data.prompts_per_round={ppr}", f"trainer.rounds={rounds}", f"trainer.seed={seed}",
           f"trainer.output_dir={out}", "trainer.resume=disable", "trainer.logger=[jsonl]",
           "trainer.eval_before_training=false", *overrides]
    begin = time.time()
    train_run(cmd, f"{name}, seed {seed}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    by_round = lambda kind: sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["round"])  # noqa: E731
    test = [per_prompt_correct(out / "checkpoints" / str(t), paths["test"]) for t in range(1, rounds + 1)]
    record = {"method": name, "seed": seed, "command": cmd[2:], "test": test,
              "test_acc": [accuracy(b) for b in test], "dev_acc": [r["val/acc"] for r in by_round("val")],
              "steps": [sum(1 for r in rows if r["kind"] == "train" and r["round"] == t) for t in range(1, rounds + 1)],
              "chosen_drift": chosen_drifts(rows, rounds),
              "pairs": pair_counts(rows, rounds), "seconds": time.time() - begin}
    save(result_file, record)
    shutil.rmtree(out / "checkpoints")  # scored; the metrics stay for diagnosis (benchmarks/diagnose_online_dpo.py)
    print(f"{name} seed {seed}: test {' '.join(f'{100 * a:.1f}' for a in record['test_acc'])}  "
          f"steps {record['steps']}  ({record['seconds']:.0f} s)", flush=True)
    return record


def train_run(cmd: list[str], label: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------------------ confirmation on fresh prompts

def fresh_prompts(paths: dict[str, Path], n: int) -> Path:
    """`n` problems of the task's distribution that no split holds: the generator's next ones after the build's
    train and val problems (generate_problems is one seeded stream of distinct questions; the generator's settings
    are read from the build's own record)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spinlm.tasks.arith import generate_problems, to_rows

    path = paths["dev"].parent / f"fresh{n}.parquet"
    if not path.exists():
        t = json.loads((paths["task"] / "build_info.json").read_text())
        problems = generate_problems(t["n_train"] + t["n_val"] + n, t["seed"], min_steps=t["min_steps"],
                                     max_steps=t["max_steps"], max_number=t["max_number"])
        pq.write_table(pa.Table.from_pylist(to_rows(problems[t["n_train"] + t["n_val"]:], "fresh")), path)
    return path


def confirm(settings: dict, paths: dict[str, Path], work: Path, results: Path) -> dict:
    """The confirmation test of `settings["confirm"]`: its method and continued SFT, last round, scored on fresh
    prompts. Each run is retrained from its recorded command (the result files keep no checkpoints) and its
    held-out answers compared with the recorded ones, so the fresh scores are known to be the same models'."""
    result_file = results / "confirm.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    spec, rounds = settings["confirm"], settings["rounds"]
    fresh = fresh_prompts(paths, spec["n_prompts"])
    record = {"method": spec["method"], "round": rounds, "n_prompts": spec["n_prompts"], "fresh": {}, "reproduced": {}}
    for name in (spec["method"], BASELINE):
        for seed in settings["seeds"]:
            run = json.loads((results / "runs" / f"{slug(name)}-s{seed}.json").read_text())
            out = work / "runs" / f"{slug(name)}-s{seed}"
            shutil.rmtree(out, ignore_errors=True)
            train_run([sys.executable, "-m", *run["command"]], f"{name}, seed {seed} (rerun)")
            checkpoint = out / "checkpoints" / str(rounds)
            held_out = per_prompt_correct(checkpoint, paths["test"])
            record["reproduced"].setdefault(name, {})[seed] = sum(a != b for a, b in zip(held_out, run["test"][-1]))
            record["fresh"].setdefault(name, {})[seed] = per_prompt_correct(checkpoint, fresh)
            shutil.rmtree(out / "checkpoints")
            print(f"confirm: {name} seed {seed}: fresh {100 * accuracy(record['fresh'][name][seed]):.1f}, "
                  f"{record['reproduced'][name][seed]} held-out answers differ from the recorded run", flush=True)
    save(result_file, record)
    return record


# -------------------------------------------------------------------------------------------------------- analysis

def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), se


def seed_averaged(bit_strings: list[str]) -> list[float]:
    """Per prompt, the mean over seeds of correct (1) / wrong (0)."""
    return [statistics.mean(int(b[i]) for b in bit_strings) for i in range(len(bit_strings[0]))]


def paired(method_bits: dict[int, str], base_bits: dict[int, str]) -> dict:
    """Method minus continued SFT, paired per held-out prompt and seed (the seeds both have). `se_prompts`: the
    standard error over prompts of the per-prompt difference averaged over seeds (prompts are the sampling unit;
    seed-to-seed variation shows in `per_seed`); `se_seeds`: the standard error of the per-seed mean differences."""
    seeds = sorted(set(method_bits) & set(base_bits))
    if not seeds:  # a partial study: the baseline has not run at these seeds yet
        return {"seeds": []}
    per_prompt = [m - b for m, b in zip(seed_averaged([method_bits[s] for s in seeds]),
                                        seed_averaged([base_bits[s] for s in seeds]))]
    per_seed = [accuracy(method_bits[s]) - accuracy(base_bits[s]) for s in seeds]
    diff, se_prompts = mean_se(per_prompt)
    return {"seeds": seeds, "diff": diff, "se_prompts": se_prompts, "per_seed": per_seed,
            "se_seeds": mean_se(per_seed)[1]}


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f}"


def points(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}"


def curve_table(curve: list[dict], chosen: int) -> list[str]:
    """One row per SFT pass; the held-out change against the previous pass is paired per prompt (± its SE)."""
    lines = ["| SFT pass | steps | dev exact match (%) | held-out exact match (%) | held-out change vs previous pass "
             "(paired, ± SE) |", "|---|---|---|---|---|"]
    for i, p in enumerate(curve):
        change = ""
        if i:
            diff, se = mean_se([int(a) - int(b) for a, b in zip(p["test"], curve[i - 1]["test"])])
            change = f"{pct(diff)} ± {points(se)}"
        mark = " **(start)**" if i == chosen else ""
        lines.append(f"| {p['pass']}{mark} | {p['steps']} | {100 * p['dev_acc']:.1f} | {100 * p['test_acc']:.1f} "
                     f"| {change} |")
    return lines


def accuracy_table(runs: dict, start_bits: str, rounds: int) -> list[str]:
    lines = ["| method | seeds | steps per round | pairs (SFT: rows) per round | plateau start | "
             + " | ".join(f"round {t}" for t in range(1, rounds + 1)) + " |", "|---|---|---|---|---|" + "---|" * rounds]
    start_mean, start_se = mean_se([float(c) for c in start_bits])
    for name, by_seed in runs.items():
        cells = []
        for t in range(rounds):
            m, se = mean_se(seed_averaged([r["test"][t] for r in by_seed.values()]))
            cells.append(f"{100 * m:.1f} ± {100 * se:.1f}")
        steps = "/".join(str(round(statistics.mean(r["steps"][t] for r in by_seed.values()))) for t in range(rounds))
        pairs = ("/".join(str(round(statistics.mean(r["pairs"][t] for r in by_seed.values()))) for t in range(rounds))
                 if all("pairs" in r for r in by_seed.values()) else "-")
        lines.append(f"| {name} | {len(by_seed)} | {steps} | {pairs} | {100 * start_mean:.1f} ± {100 * start_se:.1f} | "
                     + " | ".join(cells) + " |")
    return lines


def paired_table(runs: dict, rounds: int) -> list[str]:
    lines = ["| method | round | seeds | difference (points) | SE over prompts | diff / SE | per-seed differences "
             "| SE over seeds |", "|---|---|---|---|---|---|---|---|"]
    base = runs.get(BASELINE, {})
    for name, by_seed in runs.items():
        if name == BASELINE:
            continue
        for t in range(rounds):
            p = paired({s: r["test"][t] for s, r in by_seed.items()}, {s: r["test"][t] for s, r in base.items()})
            if not p["seeds"]:
                continue
            z = p["diff"] / p["se_prompts"] if p["se_prompts"] > 0 else float("nan")
            lines.append(f"| {name} | {t + 1} | {len(p['seeds'])} | {pct(p['diff'])} | {100 * p['se_prompts']:.1f} "
                         f"| {z:+.1f} | {' '.join(pct(d) for d in p['per_seed'])} | {points(p['se_seeds'])} |"
                         if not math.isnan(z) else
                         f"| {name} | {t + 1} | {len(p['seeds'])} | {pct(p['diff'])} | 0.0 | n/a | "
                         f"{' '.join(pct(d) for d in p['per_seed'])} | n/a |")
    return lines


def start_table(runs: dict, start_bits: str, rounds: int) -> list[str]:
    """Each method's last round minus the plateau start, paired per prompt (the start is one checkpoint)."""
    lines = ["| method | seeds | round | change vs plateau start (points) | SE over prompts | diff / SE |",
             "|---|---|---|---|---|---|"]
    for name, by_seed in runs.items():
        per_prompt = [m - int(s) for m, s in zip(seed_averaged([r["test"][rounds - 1] for r in by_seed.values()]),
                                                 start_bits)]
        diff, se = mean_se(per_prompt)
        lines.append(f"| {name} | {len(by_seed)} | {rounds} | {pct(diff)} | {100 * se:.1f} | "
                     f"{diff / se if se > 0 else float('nan'):+.1f} |")
    return lines


def confirm_section(record: dict) -> list[str]:
    """The confirmation test's write-up: fresh-prompt accuracies and the paired difference, as in paired_table."""
    name, n = record["method"], record["n_prompts"]
    method, base = record["fresh"][name], record["fresh"][BASELINE]
    p = paired({int(s): b for s, b in method.items()}, {int(s): b for s, b in base.items()})
    z = p["diff"] / p["se_prompts"]
    acc = lambda bits: mean_se(seed_averaged(list(bits.values())))  # noqa: E731
    differ = [k for by_seed in record["reproduced"].values() for k in by_seed.values()]
    return [
        f"### Confirmation on {n} fresh prompts",
        "",
        f"The largest difference above was found after looking at these 1000 held-out prompts, so it was tested once "
        f"more, on {n} problems of the same distribution that no split holds (the generator's next ones), with the same "
        f"runs: each was retrained from its recorded command, and {sum(k == 0 for k in differ)} of {len(differ)} reruns "
        "gave exactly the recorded held-out answers"
        + (f" (the others differ on at most {max(differ)} of 1000)." if any(differ) else "."),
        "",
        "| method | round | seeds | fresh exact match (%) | continued SFT (%) | difference (points) | SE over prompts | "
        "diff / SE | per-seed differences | SE over seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {name} | {record['round']} | {len(p['seeds'])} | {100 * acc(method)[0]:.1f} ± {100 * acc(method)[1]:.1f} | "
        f"{100 * acc(base)[0]:.1f} ± {100 * acc(base)[1]:.1f} | {pct(p['diff'])} | {100 * p['se_prompts']:.2f} | "
        f"{z:+.1f} | {' '.join(pct(d) for d in p['per_seed'])} | {points(p['se_seeds'])} |",
        "",
    ]


def drift_table(runs: dict, rounds: int) -> list[str]:
    lines = ["| method | " + " | ".join(f"round {t}" for t in range(1, rounds + 1)) + " |", "|---|" + "---|" * rounds]
    for name, by_seed in runs.items():
        cells = []
        for t in range(rounds):
            values = [r["chosen_drift"][t] for r in by_seed.values()
                      if t < len(r["chosen_drift"]) and r["chosen_drift"][t] is not None]
            cells.append(f"{statistics.mean(values):+.2f}" if values else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plots(curve: list[dict], chosen: int, runs: dict, start_bits: str, rounds: int, out_dir: Path, tag: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve_png, rounds_png = out_dir / f"{tag}_sft_curve.png", out_dir / f"{tag}_rounds.png"
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = [p["steps"] for p in curve]
    ax.plot(steps, [100 * p["dev_acc"] for p in curve], marker="o", label="dev (picks the start)")
    ax.plot(steps, [100 * p["test_acc"] for p in curve], marker="s", label="held-out test")
    ax.axvline(curve[chosen]["steps"], color="grey", ls="--", lw=1, label="plateau start")
    ax.set_xlabel("SFT steps (one pass over the SFT split per point)")
    ax.set_ylabel("greedy exact match (%)")
    ax.set_title("SFT to its plateau")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(curve_png, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    start = 100 * accuracy(start_bits)
    for name, by_seed in runs.items():
        means, ses = [start], [100 * mean_se([float(c) for c in start_bits])[1]]
        for t in range(rounds):
            m, se = mean_se(seed_averaged([r["test"][t] for r in by_seed.values()]))
            means.append(100 * m)
            ses.append(100 * se)
        ax.errorbar(range(rounds + 1), means, yerr=ses, marker="o", capsize=3, label=name)
    ax.set_xlabel("round (0 = the SFT plateau start)")
    ax.set_ylabel("held-out exact match, greedy (%)")
    ax.set_title("From the SFT plateau (mean over seeds ± SE over prompts)")
    ax.set_xticks(range(rounds + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(rounds_png, dpi=120)
    plt.close(fig)
    return [curve_png, rounds_png]


# ------------------------------------------------------------------------------------------------------------ main

def included_study(name: str, title: str, note: str) -> list[str]:
    """Another study's write-up (benchmarks/results/NAME.md, its reading included), headings one level down."""
    path = RESULTS / f"{name}.md"
    if not path.exists():
        return []
    text = path.read_text().rstrip().splitlines()
    return [f"# {title}", "", note, "", *[("#" + line) if line.startswith("#") else line for line in text[1:]], ""]


def locations(settings: dict, quick: bool) -> tuple[Path, Path, Path]:
    """(results, work, cache) of a task: results committed (small JSON), work and cache git-ignored."""
    if quick:
        root = Path("/tmp/plateau_quick")
        return root / "results", root / "work", root / "cache"
    return RESULTS / settings["name"], REPO / "outputs" / settings["dir"], REPO / ".cache" / settings["dir"]


def run_task(settings: dict, quick: bool, names: list[str]) -> None:
    results, work, cache = locations(settings, quick)
    paths = build_task(cache, settings)
    curve = sft_curve(paths, settings, work, results)
    chosen = max(range(len(curve)), key=lambda i: curve[i]["dev_acc"])
    start_model = Path(curve[chosen]["model"])
    print(f"plateau start: SFT pass {chosen + 1} (dev {100 * curve[chosen]['dev_acc']:.1f}, "
          f"held-out {100 * curve[chosen]['test_acc']:.1f})", flush=True)
    for seed in settings["seeds"]:  # seed-major: a cut-short study has every method at its first seeds
        for name in [n for n in names if n in task_methods(settings)]:
            run_method(name, seed, start_model, paths, settings, work, results)
    if "confirm" in settings and {settings["confirm"]["method"], BASELINE} <= set(names):  # the runs it retrains
        confirm(settings, paths, work, results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the same pipeline at toy scale (~3 min); outputs to /tmp")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="task settings to run")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of the method runs (default 1 2 3)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="names of METHODS to run (default: all)")
    p.add_argument("--markdown-only", action="store_true", help="run nothing; write RESULTS.md and the plots from "
                                                                 "the results on disk (a study still running)")
    args = p.parse_args()
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from: {list(METHODS)}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    chosen_tasks = [dict(QUICK)] if args.quick else [dict(TASKS[t]) for t in args.tasks]
    names = [n for n in METHODS if n in args.methods]
    if not args.markdown_only:
        for settings in chosen_tasks:
            if args.seeds:
                settings["seeds"] = args.seeds
            run_task(settings, args.quick, names)
    sections = [task_section(settings, args.quick) for settings in ([QUICK] if args.quick else TASKS.values())]
    write_markdown([s for s in sections if s], args.quick)


def load_runs(settings: dict, results: Path) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for name in task_methods(settings):
        for seed in settings["seeds"]:
            path = results / "runs" / f"{slug(name)}-s{seed}.json"
            if path.exists():
                runs.setdefault(name, {})[seed] = json.loads(path.read_text())
    return runs


def task_section(settings: dict, quick: bool) -> list[str]:
    """The markdown of one task's study from its result files; [] when its SFT curve has not started."""
    results = locations(settings, quick)[0]
    if not (results / "sft_curve.json").exists():
        return []
    curve = json.loads((results / "sft_curve.json").read_text())["passes"]
    chosen = max(range(len(curve)), key=lambda i: curve[i]["dev_acc"])
    runs = load_runs(settings, results)
    rounds, task = settings["rounds"], settings["task"]
    stopped = len(curve) - 1 - chosen >= settings["patience"]
    out_dir = results.parent if not quick else results
    pngs = plots(curve, chosen, runs, curve[chosen]["test"], rounds, out_dir, settings["name"])
    n_params = json.loads((results / "sft_curve.json").read_text()).get("n_params")
    run_seconds = sum(r["seconds"] for by_seed in runs.values() for r in by_seed.values())
    sft_seconds = sum(p["seconds"] for p in curve)
    missing = sorted({(n, s) for n in task_methods(settings) for s in settings["seeds"]}
                     - {(n, s) for n, by_seed in runs.items() for s in by_seed})
    rel = (lambda path: os.path.relpath(path, REPO)) if not quick else str
    status = ("**Partial:** missing runs (method, seed): " + "; ".join(f"{n} s{s}" for n, s in missing) + "."
              if missing else "All runs finished: every method at seeds " + " ".join(map(str, settings["seeds"])) + ".")
    if not stopped:
        status += (f" **The SFT curve did not reach its stopping rule** ({len(curve)} of at most "
                   f"{settings['max_passes']} passes done, best pass {chosen + 1}).")
    n_params = f"{n_params / 1e6:.2f}M parameters" if n_params else "(size not recorded: rerun the study)"
    return [
        f"## Task: {settings['title']}",
        "",
        status,
        "",
        f"- **Data**: the bundled arithmetic word problems (`spinlm/tasks/build.py`) with {task['min_steps']}-"
        f"{task['max_steps']} operations and numbers up to {task['max_number']}; {task['n_sft']} SFT rows, "
        f"{settings['n_dev']} dev rows (train rows outside the SFT split) to pick the SFT checkpoint, "
        f"**{task['n_val']} held-out test prompts** (val.parquet), never used for a choice.",
        f"- **Model**: a Llama of {n_params} ({task['model_kwargs']}).",
        f"- **SFT curve**: passes of {settings['pass_steps']} steps (batch 16, lr 1e-3, warmup + cosine within a "
        f"pass), each from the previous; stop after {settings['patience']} passes without a new best dev accuracy; "
        "the best pass by dev accuracy is every method's start.",
        f"- **Methods**: {rounds} rounds of {settings['prompts_per_round']} prompts from the SFT split; online DPO's "
        f"round is `algorithm.ref_update_every={settings['prompts_per_round'] // 32}` steps of 32 prompts x 8 samples."
        + (f" *{ANSWER_ONLY}* draws its rounds from the {task['n_train'] - task['n_sft'] - settings['n_dev']} train "
           "rows outside the SFT and dev splits, given without their worked solutions (prompt and final answer only)."
           if settings.get("answer_only_prompts") else ""),
        f"- **Wall time**: {sft_seconds / 60:.0f} min of SFT training (evaluations not included) and "
        f"{run_seconds / 60:.0f} min for the {sum(map(len, runs.values()))} method runs (training plus per-prompt "
        f"scoring of every round), summed. Raw JSON: `{rel(results)}/`.",
        "",
        "### The SFT curve",
        "",
        *curve_table(curve, chosen),
        "",
        f"![SFT curve]({rel(pngs[0])})",
        "",
        "### From the plateau: held-out exact match (%), mean over seeds ± SE over prompts",
        "",
        *accuracy_table(runs, curve[chosen]["test"], rounds),
        "",
        f"![rounds]({rel(pngs[1])})",
        "",
        f"### Paired difference against {BASELINE}",
        "",
        "Points of held-out exact match, method minus continued SFT at the same seed and round; positive: the "
        "method is better.",
        "",
        *paired_table(runs, rounds),
        "",
        f"### Change from the plateau start after round {rounds}",
        "",
        *start_table(runs, curve[chosen]["test"], rounds),
        "",
        *(confirm_section(json.loads((results / "confirm.json").read_text()))
          if (results / "confirm.json").exists() else []),
        "### Chosen drift (nats, mean over seeds; negative: the chosen log-prob fell below the opponent's)",
        "",
        *drift_table(runs, rounds),
        "",
    ]


def write_markdown(sections: list[list[str]], quick: bool) -> None:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    out_md = REPO / "RESULTS.md" if not quick else locations(QUICK, True)[0] / "RESULTS.md"
    md = [
        "# Results: does self-play beat more SFT from an SFT plateau?",
        "",
        f"Made by `benchmarks/plateau_study.py` on {cpu}, {os.cpu_count()} cores (shared with other jobs), torch "
        f"{torch.__version__}. SPIN's fixed point is the data distribution, so the paper starts from an SFT model "
        "that one more SFT epoch no longer improves; this study trains SFT to that plateau first, then runs every "
        "method from it on the prompts and ground truths the SFT saw.",
        "",
        "Methods (`spinlm train preset=tiny` plus): "
        + "; ".join(f"*{n}*: `{' '.join(o)}`" for n, o in METHODS.items()) + ".",
        "",
        "Noise: accuracies are means over seeds, with the standard error over held-out prompts of the seed-averaged "
        "correctness. Paired differences are per held-out prompt and seed (method minus continued SFT at the same "
        "seed and round): the mean, its SE over prompts (of the per-prompt difference averaged over seeds), and the "
        "per-seed mean differences with their SE over seeds (3 seeds: a rough SE).",
        "",
        "```",
        "nice -n 19 .venv/bin/python benchmarks/plateau_study.py                  # all tasks; resumable: skips runs with a result file",
        "nice -n 19 .venv/bin/python benchmarks/plateau_study.py --tasks easy     # one task",
        "nice -n 19 .venv/bin/python benchmarks/plateau_study.py --markdown-only  # tables and plots from the results on disk",
        "nice -n 19 .venv/bin/python benchmarks/plateau_study.py --quick          # the pipeline at toy scale, to /tmp",
        "```",
        "",
    ]
    reading = RESULTS / "plateau_reading.md"
    if reading.exists() and not quick:  # the written interpretation, kept across regenerations
        md += [reading.read_text().rstrip(), ""]
    for section in sections:
        md += section
    if not quick:
        md += included_study("smollm2", "A real pretrained model: SmolLM2-135M-Instruct (benchmarks/smollm2_study.py)",
                             "Regenerate with `benchmarks/smollm2_study.py` (it fetches and converts the model).")
        md += included_study("quality", "Earlier study: the bundled tiny task from a weak SFT start "
                             "(benchmarks/quality.py)", "Kept as measured: a different start (10.5%, far from its SFT "
                             "plateau), 200 val prompts; regenerate with `benchmarks/quality.py`.")
    out_md.write_text("\n".join(md) + "\n")
    print(f"wrote {out_md}")


if __name__ == "__main__":
    main()
