"""Diagnose an online-DPO run directory (issue 15, item 1): are the pairs, rewards and log-probs what the method
intends?

Per round, from rounds/<t>/pairs.parquet, metrics.jsonl and config.yaml of a finished run:
  pairs          pairs trained on, and the share of the round's prompts that gave one (the rest were ties)
  correct/wrong  share of pairs whose chosen is correct (reward > 0) and rejected incorrect (reward <= 0)
  rewards        the (chosen, rejected) reward values and how many pairs had each
  sft_on_wrong   share of pairs whose chosen is incorrect yet trained on by the SFT term (algorithm.sft_weight > 0
                 and not algorithm.sft_on_correct_only)
  pass@k - acc   held-out headroom after the round: sampled pass@k (trainer.val_pass_k) minus greedy accuracy
  drift          mean chosen log-prob of the policy minus the reference's over the round's steps (nats)
  step-1 gap     |policy - reference| chosen log-prob at the round's first step, before any update of that round:
                 0 when the reference is the round's starting policy (algorithm.reference=refresh)

    python benchmarks/diagnose_online_dpo.py RUN_DIR [--json OUT.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml


def diagnose(run_dir: Path) -> list[dict]:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    algo = cfg["algorithm"]
    sft_on_all = algo["sft_weight"] > 0 and not algo.get("sft_on_correct_only", False)
    k = cfg["trainer"].get("val_pass_k")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["round"]: r for r in rows if r["kind"] == "val" and "val/acc" in r}
    health = {r["round"]: r for r in rows if r["kind"] == "health"}
    out = []
    rounds = sorted(int(p.name) for p in (run_dir / "rounds").iterdir() if (p / "pairs.parquet").exists())
    for t in rounds:
        pairs = pq.read_table(run_dir / "rounds" / str(t) / "pairs.parquet",
                              columns=["chosen_score", "rejected_score"]).to_pydict()
        chosen, rejected = pairs["chosen_score"], pairs["rejected_score"]
        n = len(chosen)
        rollouts = [r for r in rows if r["kind"] == "rollout" and r["round"] == t]
        prompts = sum(r["rollout/pairs"] + r["rollout/ties_dropped"] for r in rollouts)
        train = [r for r in rows if r["kind"] == "train" and r["round"] == t]
        row = {
            "round": t,
            "pairs": n,
            "prompts": int(prompts),
            "pair_rate": n / prompts if prompts else float("nan"),
            "sample_reward": sum(r["rollout/reward_mean"] for r in rollouts) / max(len(rollouts), 1),
            "correct_vs_wrong": sum(c > 0 >= r for c, r in zip(chosen, rejected)) / n if n else float("nan"),
            "rewards": {f"{c:g} vs {r:g}": m for (c, r), m in collections.Counter(zip(chosen, rejected)).most_common()},
            "sft_on_wrong": (sum(c <= 0 for c in chosen) / n if n else float("nan")) if sft_on_all else 0.0,
            "drift": health.get(t, {}).get("train/chosen_drift"),
            "step1_gap": abs(train[0]["logps/chosen"] - train[0]["logps/ref_chosen"]) if train else None,
        }
        before, after = val.get(t - 1, {}), val.get(t, {})
        row["acc_before"], row["acc"] = before.get("val/acc"), after.get("val/acc")
        if k and f"val/pass@{k}" in after:
            row[f"pass@{k}"] = after[f"val/pass@{k}"]
            row["headroom"] = after[f"val/pass@{k}"] - after["val/acc"]
        out.append(row)
    if k and 0 in val and f"val/pass@{k}" in val[0]:  # the start model's headroom, as round 0
        out.insert(0, {"round": 0, "acc": val[0]["val/acc"], f"pass@{k}": val[0][f"val/pass@{k}"],
                       "headroom": val[0][f"val/pass@{k}"] - val[0]["val/acc"]})
    return out


def markdown(rows: list[dict]) -> str:
    cols = ["round", "pairs", "prompts", "pair_rate", "sample_reward", "correct_vs_wrong", "sft_on_wrong", "acc",
            "headroom", "drift", "step1_gap", "rewards"]
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else  # noqa: E731
                                           ", ".join(f"{a}: {b}" for a, b in v.items()) if isinstance(v, dict) else str(v))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="trainer.output_dir of a finished online_dpo run")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if not (args.run_dir / "rounds").is_dir() or not (args.run_dir / "metrics.jsonl").is_file():
        print(f"{args.run_dir}: not a run directory (expected rounds/ and metrics.jsonl; trainer.logger needs jsonl)",
              file=sys.stderr)
        return 2
    rows = diagnose(args.run_dir)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
