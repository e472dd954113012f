"""The model card (README.md) of a checkpoint's Hugging Face folder: what it was trained from, on what, how, for
how many rounds, and how it scored on the held-out prompts, as Hugging Face users expect to find it."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

METHODS = {"spin": "SPIN (self-play fine-tuning): chosen = the ground-truth response, rejected = the opponent's own "
                   "sample; the opponent is the model the round started from",
           "online_dpo": "online DPO: n samples per prompt judged by a reward, best against worst (ties dropped); the "
                         "opponent is refreshed every round"}


def _files(value) -> str:
    if value is None:
        return "-"
    files = [value] if isinstance(value, str) else list(value)
    return ", ".join(f"`{f}`" for f in files)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(cfg, round_done: int, val: dict[str, float], start_val: dict[str, float] | None = None) -> str:
    """The card's text. cfg: the run's (resolved) config; val: this checkpoint's val/* metrics; start_val: those of
    the model before training, when they were measured."""
    c = OmegaConf.to_container(cfg, resolve=True)
    a, r, act, d, t, m = c["algorithm"], c["rollout"], c["actor"], c["data"], c["trainer"], c["model"]
    tag = "spin" if a["mode"] == "spin" else "online-dpo"
    settings = [
        ("method", f"`algorithm.mode={a['mode']}`: {METHODS[a['mode']]}"),
        ("rounds", f"{round_done} of {t['rounds']}"),
        ("loss", f"{a['loss_type']}, beta {a['beta']}" + (f", DPOP lambda {a['dpop_lambda']}" if a["dpop_lambda"] else "")
         + (f", SFT weight {a['sft_weight']}" if a["sft_weight"] else "")),
        ("optimizer", f"{act['optimizer']}, lr {act['lr']}, {act['lr_scheduler']} schedule, warmup {act['warmup_ratio']}"),
        ("batch", f"{t['train_batch_size']} " + ("pairs" if a["mode"] == "spin" else "prompts") + " per step"),
        ("sampling", f"n {r['n']}, temperature {r['temperature']}, top_p {r['top_p']}, engine {r['engine']}"),
        ("lengths", f"prompt <= {d['max_prompt_length']}, response <= {d['max_response_length']} tokens"),
    ]
    if a["mode"] == "spin":
        settings.append(("per round", f"{d['prompts_per_round'] or 'all'} prompts, {t['epochs_per_round']} epoch(s)"))
    else:
        settings.append(("per round", f"{a['ref_update_every']} steps; reward: "
                                      + (f"`{c['reward']['custom_path']}`" if c["reward"]["custom_path"] else
                                         f"built-in ({c['reward']['gsm8k_method']} GSM8K match)")
                                      + (f", reward model `{c['reward']['model_path']}`" if c["reward"]["model_path"]
                                         else "")))
    if m["lora"]["rank"]:
        settings.append(("LoRA", f"rank {m['lora']['rank']}, alpha {m['lora']['alpha']} (merged into these weights)"))
    settings += [("dtype", m["dtype"]), ("seed", str(t["seed"]))]

    lines = ["---", f"base_model: {m['path']}", "library_name: transformers", f"tags: [spinlm, {tag}, dpo]", "---", "",
             f"# {Path(t['output_dir']).name}, round {round_done}", "",
             f"Fine-tuned from `{m['path']}` with spinlm for {round_done} round(s).", "",
             "## Data", "", "| split | files |", "|---|---|",
             f"| train | {_files(d['train_files'])} |", f"| validation | {_files(d['val_files'])} |", "",
             "## Training", "", "| setting | value |", "|---|---|",
             *(f"| {k} | {v} |" for k, v in settings), ""]
    lines += ["## Validation", ""]
    shown = sorted(k for k in val if k.startswith("val/"))
    if not shown:
        lines += ["No validation set (data.val_files is null).", ""]
    else:
        before = start_val or {}
        lines += ["| metric | before training | this checkpoint |", "|---|---|---|",
                  *(f"| {k} | {_fmt(before[k]) if k in before else '-'} | {_fmt(val[k])} |" for k in shown), ""]
        lines += [f"Greedy answers to {'the first ' + str(d['val_max_samples']) if d['val_max_samples'] else 'all'} "
                  "validation prompts, scored by the reward function (val/acc: the share answered right).", ""]
    return "\n".join(lines)


def write_model_card(folder: Path, cfg, round_done: int, val: dict, start_val: dict | None = None) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(cfg, round_done, val, start_val), encoding="utf-8")
    return path
