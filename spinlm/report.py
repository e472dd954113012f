"""`spinlm report RUN_DIR`: a run directory's curves, round table and example pairs, as PNG plots, report.md and a
self-contained report.html (plots embedded), written to RUN_DIR/report/. Reads only the files a run writes:
metrics.jsonl (required), rounds.json, rounds/<t>/pairs.parquet and config.yaml (each optional)."""
from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from spinlm.errors import UserError
from spinlm.run_dir import (METRICS_FILE, ROUND_TABLE_FILE, RunDir, read_pairs_table, read_round_table,
                            rounds_with_pairs)

EXAMPLES_PER_ROUND = 3
TABLE_COLUMNS = ("round", "val_acc", "margins", "accuracies", "logps_chosen", "sample_reward", "time_s")
MARGINS = dict(left=0.12, right=0.98, top=0.9, bottom=0.15)  # fixed: a layout engine would double the draw time
CONFIG_KEYS = ("model.path", "algorithm.mode", "algorithm.loss_type", "algorithm.beta", "algorithm.dpop_lambda",
               "algorithm.sft_weight", "actor.lr", "trainer.rounds", "trainer.train_batch_size", "rollout.n",
               "trainer.seed")


@dataclass
class RunRecord:
    """What a run directory holds, read once."""

    run_dir: Path
    rows: list[dict]
    table: list[dict]
    settings: dict[str, str]
    examples: dict[int, list[dict]] = field(default_factory=dict)  # round -> a few pairs
    chosen_length: dict[int, float] = field(default_factory=dict)  # round -> mean chosen tokens
    rejected_length: dict[int, float] = field(default_factory=dict)

    def kind(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r["kind"] == kind]


def write_report(run_dir) -> Path:
    """Write RUN_DIR/report/ and return the path of its report.html."""
    record = read_run(Path(run_dir))
    out = RunDir(record.run_dir).report
    out.mkdir(exist_ok=True)
    plots = draw_plots(record, out)
    (out / "report.md").write_text(render_markdown(record, plots))
    html_path = out / "report.html"
    html_path.write_text(render_html(record, plots))
    return html_path


# ---- reading -------------------------------------------------------------------------------------------------------
def read_run(run_dir: Path) -> RunRecord:
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    run = RunDir(run_dir)
    return RunRecord(run_dir, read_metrics(run.metrics), read_round_table(run_dir), read_settings(run.config),
                     *read_pair_examples(run_dir))


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: not found; a run directory has {METRICS_FILE} once a run has started "
                        "(with trainer.logger including jsonl, the default)")
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the last line of a run killed mid-write: the trainer drops it on resume too
                break
            raise UserError(f"{path}, line {number}: not valid JSON ({exc})") from exc
        if not isinstance(row, dict) or not {"round", "step", "kind"} <= set(row):
            raise UserError(f"{path}, line {number}: expected an object with round, step and kind")
        rows.append(row)
    return rows


def read_settings(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    import yaml
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from exc
    return {k: str(OmegaConf.select(cfg, k)) for k in CONFIG_KEYS if OmegaConf.select(cfg, k) is not None}


def read_pair_examples(run_dir: Path) -> tuple[dict, dict, dict]:
    """Per round with pairs: a few example pairs, and the mean chosen and rejected lengths in tokens."""
    examples, chosen_length, rejected_length = {}, {}, {}
    for t in rounds_with_pairs(run_dir):
        try:
            table = read_pairs_table(run_dir, t, ["prompt", "chosen", "rejected", "chosen_ids", "rejected_ids"])
        except Exception as exc:  # pyarrow's many error types: a report names the file either way
            raise UserError(f"{RunDir(run_dir).pairs(t)}: cannot read the round's pairs "
                            f"({type(exc).__name__}: {exc})") from exc
        examples[t] = table.select(["prompt", "chosen", "rejected"]).slice(0, EXAMPLES_PER_ROUND).to_pylist()
        if table.num_rows:
            chosen_length[t] = pc.mean(pc.list_value_length(table["chosen_ids"])).as_py()
            rejected_length[t] = pc.mean(pc.list_value_length(table["rejected_ids"])).as_py()
    return examples, chosen_length, rejected_length


# ---- plots ---------------------------------------------------------------------------------------------------------
@dataclass
class Plot:
    name: str
    title: str
    path: Path


def draw_plots(record: RunRecord, out: Path) -> list[Plot]:
    plots = []
    train = record.kind("train")
    for name, title, keys in [
        # "loss" is what the optimizer minimised: the preference loss (with its DPOP term) + sft_weight x SFT NLL
        ("loss", "Training loss per step (preference + DPOP + SFT terms)", ["loss"]),
        ("margins", "Reward margins per step (chosen - rejected)", ["rewards/margins"]),
        # a round's first step trains the policy against itself: every margin is exactly 0, so no pair is ranked
        ("accuracies", "Reward accuracy per step (chosen ranked above rejected)\n0 at a round's first step: the "
                       "policy is still the opponent, every margin is 0", ["rewards/accuracies"]),
        ("sft_nll", "Chosen responses' NLL per token (the SFT term, trained when algorithm.sft_weight > 0)",
         ["train/sft_nll"]),
        ("logps", "Sequence log-probs per step", ["logps/chosen", "logps/rejected"]),
    ]:
        series = {k: [(r["step"], r[k]) for r in train if k in r] for k in keys}
        if any(series.values()):
            plots.append(_save(_step_figure(series, train, title), out, name, title))
    val = _per_round(record.kind("val"), "val/acc")
    if val:
        title = "Held-out accuracy per round (round 0: before training)"
        plots.append(_save(_round_figure({"val/acc": val}, title, "accuracy"), out, "val_accuracy", title))
    lengths = {"rejected (pairs)": record.rejected_length, "chosen (pairs)": record.chosen_length,
               "sampled (rollout)": _per_round(record.kind("rollout"), "rollout/response_length"),
               "greedy (eval)": _per_round(record.kind("val"), "val/response_length")}
    if any(lengths.values()):
        title = "Response length per round (tokens)"
        plots.append(_save(_round_figure(lengths, title, "tokens"), out, "response_length", title))
    return plots


def _per_round(rows: list[dict], key: str) -> dict[int, float]:
    """Mean of a key per round (online_dpo logs several rollouts per round); NaN values left out."""
    sums: dict[int, list[float]] = {}
    for r in rows:
        if key in r and r[key] is not None and math.isfinite(r[key]):
            sums.setdefault(r["round"], []).append(r[key])
    return {t: sum(v) / len(v) for t, v in sorted(sums.items())}


def _step_figure(series: dict[str, list], train: list[dict], title: str):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state, Agg canvas by default

    fig = Figure(figsize=(7, 3.2), dpi=100)
    fig.subplots_adjust(**MARGINS)
    ax = fig.add_subplot()
    for key, points in series.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 50 else None, label=key)
    steps: dict[int, list[int]] = {}
    for r in train:
        steps.setdefault(r["round"], []).append(r["step"])
    for i, (t, s) in enumerate(sorted(steps.items())):  # rounds marked: alternate shading, labelled at the top
        lo, hi = min(s) - 0.5, max(s) + 0.5
        ax.axvspan(lo, hi, color="grey", alpha=0.12 if i % 2 == 0 else 0.04, linewidth=0)
        ax.annotate(f"round {t}", ((lo + hi) / 2, 0.98), xycoords=("data", "axes fraction"), ha="center", va="top",
                    fontsize=8, color="dimgrey")
    ax.set(xlabel="optimizer step")
    ax.set_title(title, fontsize=10 if "\n" in title else None)
    if "\n" in title:  # room for the second line of the title
        fig.subplots_adjust(top=0.84)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _round_figure(series: dict[str, dict[int, float]], title: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2), dpi=100)
    fig.subplots_adjust(**MARGINS)
    ax = fig.add_subplot()
    for label, values in series.items():
        if values:
            ax.plot(list(values), list(values.values()), marker="o", label=label)
    ax.set(title=title, xlabel="round", ylabel=ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _save(fig, out: Path, name: str, title: str) -> Plot:
    path = out / f"{name}.png"
    fig.savefig(path)
    return Plot(name, title, path)


# ---- rendering -----------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _table_columns(table: list[dict]) -> list[str]:
    extra = [k for r in table for k in r if k not in TABLE_COLUMNS]
    return [c for c in TABLE_COLUMNS if any(c in r for r in table)] + list(dict.fromkeys(extra))


def round_table_text(table: list[dict]) -> str:
    """The round table as aligned console text (what `spinlm train` prints at the end)."""
    cols = list(TABLE_COLUMNS)
    rows = [[_fmt(r.get(c)) for c in cols] for r in table]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in [cols, *rows])


def _fence(*texts: str) -> str:
    """A Markdown code fence longer than any backtick run in the texts it encloses."""
    longest = max((len(m) for t in texts for m in re.findall(r"`+", t)), default=0)
    return "`" * max(3, longest + 1)


def render_markdown(record: RunRecord, plots: list[Plot]) -> str:
    lines = [f"# spinlm run report: {record.run_dir.name}", "", f"Run directory: `{record.run_dir.resolve()}`", ""]
    if record.settings:
        lines += ["## Settings", "", *[f"- `{k}`: {v}" for k, v in record.settings.items()], ""]
    lines += ["## Rounds", ""]
    if record.table:
        cols = _table_columns(record.table)
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in record.table]
    else:
        lines.append(f"No round has completed yet (no {ROUND_TABLE_FILE}).")
    lines += ["", "## Plots", ""] + [f"![{p.title}]({p.path.name})\n" for p in plots]
    lines += ["## Example pairs", ""]
    for t, pairs in record.examples.items():
        lines += [f"### Round {t}", ""]
        for i, p in enumerate(pairs, 1):
            fence = _fence(p["prompt"], p["chosen"], p["rejected"])
            for part in ("prompt", "chosen", "rejected"):
                lines += [f"**{i}. {part}**", "", fence, p[part], fence, ""]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}img{max-width:100%;display:block;margin:1em 0}
.pair{display:grid;grid-template-columns:6em 1fr;gap:4px 8px;margin:1em 0;padding:8px;border:1px solid #ddd}
pre{margin:0;white-space:pre-wrap;word-break:break-word;background:#f8f8f8;padding:4px}
.chosen pre{background:#eef8ee}.rejected pre{background:#fbeeee}code{background:#f3f3f3}"""


def render_html(record: RunRecord, plots: list[Plot]) -> str:
    e = html.escape
    name = e(record.run_dir.name)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>spinlm report: {name}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>spinlm run report: {name}</h1>",
             f"<p>Run directory: <code>{e(str(record.run_dir.resolve()))}</code></p>"]
    if record.settings:
        parts.append("<h2>Settings</h2><ul>" + "".join(f"<li><code>{e(k)}</code>: {e(v)}</li>"
                                                       for k, v in record.settings.items()) + "</ul>")
    parts.append("<h2>Rounds</h2>")
    if record.table:
        cols = _table_columns(record.table)
        parts.append("<table id='rounds'><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in record.table]
        parts.append("</table>")
    else:
        parts.append(f"<p>No round has completed yet (no {ROUND_TABLE_FILE}).</p>")
    parts.append("<h2>Plots</h2>")
    for p in plots:  # embedded: the file is the whole report, to mail or attach
        data = base64.b64encode(p.path.read_bytes()).decode("ascii")
        parts.append(f"<img alt='{e(p.title)}' title='{e(p.title)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Example pairs</h2>")
    for t, pairs in record.examples.items():
        parts.append(f"<h3>Round {t}</h3>")
        for p in pairs:
            parts.append("<div class='pair'>" + "".join(
                f"<b>{part}</b><div class='{part}'><pre>{e(p[part])}</pre></div>"
                for part in ("prompt", "chosen", "rejected")) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
