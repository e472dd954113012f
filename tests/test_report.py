"""The run report and the Python API, on real smoke runs: `spinlm.train([...])` as the README shows it, the report
it writes (valid PNGs, the round table in the HTML), `spinlm report` on a good and a bad run directory, and a report
that cannot be written leaving the run's results intact with a warning."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from spinlm.errors import ConfigError, UserError
from spinlm.report import read_metrics, write_report

PLOTS = ("loss", "margins", "accuracies", "sft_nll", "logps", "val_accuracy", "response_length")


@pytest.fixture(scope="module")
def api_run(tiny_task, tmp_path_factory):
    from spinlm import train

    run_dir = tmp_path_factory.mktemp("api") / "run"
    return train(["preset=smoke", "trainer.rounds=2", f"trainer.output_dir={run_dir}"])  # the README example


def test_train_returns_the_round_table_the_run_dir_and_the_report(api_run):
    run_dir = api_run.run_dir
    assert api_run.rounds == json.loads((run_dir / "rounds.json").read_text())
    assert [r["round"] for r in api_run.rounds] == ["start", 1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "2"
    assert api_run.report == run_dir / "report" / "report.html" and api_run.report.is_file()


def test_import_spinlm_is_cheap():
    code = "import sys, spinlm; print(sorted(m for m in ('torch', 'matplotlib', 'omegaconf') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("config", [
    {"preset": "smoke", "trainer.rounds": 0, "trainer.roundz": 2},
    {"preset": "smoke", "trainer": {"rounds": 0, "roundz": 2}},
    OmegaConf.create({"preset": "smoke", "trainer": {"rounds": 0, "roundz": 2}}),
], ids=["dotted-dict", "nested-dict", "omegaconf"])
def test_train_takes_a_dict_or_an_omegaconf_config(tiny_task, config):
    from spinlm import train

    with pytest.raises(ConfigError) as caught:  # the config check sees the keys where the CLI puts them
        train(config)
    problems = caught.value.problems
    assert any(p.startswith("trainer.rounds=0:") for p in problems), problems
    assert any("trainer.roundz" in p and "did you mean" in p for p in problems), problems


def test_report_plots_are_images_and_the_html_holds_the_round_table(api_run):
    from matplotlib.image import imread

    report = api_run.report.parent
    for name in PLOTS:
        pixels = imread(report / f"{name}.png")
        assert pixels.ndim == 3 and pixels.shape[0] >= 200 and pixels.shape[1] >= 400, name
        assert pixels.std() > 0.01, name  # not a blank canvas
    page = api_run.report.read_text()
    assert page.count("src='data:image/png;base64,") == len(PLOTS)  # self-contained
    table = page[page.index("<table id='rounds'>"): page.index("</table>")]
    columns = ["round", "val_acc", "margins", "accuracies", "logps_chosen", "sample_reward", "time_s"]
    assert "<tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>" in table
    for row in json.loads((api_run.run_dir / "rounds.json").read_text()):
        cells = ["-" if row.get(c) is None else f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c])
                 for c in columns]
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" in table, row
    assert "&lt;|user|&gt;" in page and "<|user|>" not in page  # prompts are escaped, chat markers and all
    assert "<h3>Round 1</h3>" in page and "<h3>Round 2</h3>" in page
    markdown = (report / "report.md").read_text()
    assert all(f"]({name}.png)" in markdown for name in PLOTS)
    assert "| 2 | " in markdown


def test_report_command_rewrites_the_report(api_run):
    report = api_run.report.parent
    for f in report.iterdir():
        f.unlink()
    out = subprocess.run([sys.executable, "-m", "spinlm.cli", "report", str(api_run.run_dir)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"report: {api_run.report}"
    assert sorted(f.name for f in report.iterdir()) == sorted([f"{n}.png" for n in PLOTS] + ["report.html",
                                                                                              "report.md"])


def test_report_of_a_directory_without_metrics_names_the_file(tmp_path):
    (tmp_path / "rounds.json").write_text("[]")
    with pytest.raises(UserError, match=f"{tmp_path / 'metrics.jsonl'}: not found"):
        write_report(tmp_path)
    out = subprocess.run([sys.executable, "-m", "spinlm.cli", "report", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"spinlm report: error: {tmp_path / 'metrics.jsonl'}: not found" in out.stderr
    assert not (tmp_path / "report").exists()


def test_metrics_reader_drops_a_cut_last_line_and_names_a_bad_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = '{"round": 1, "step": 1, "kind": "train", "loss": 0.5}\n'
    path.write_text(good + '{"round": 1, "st')  # a run killed mid-write
    assert read_metrics(path) == [{"round": 1, "step": 1, "kind": "train", "loss": 0.5}]
    path.write_text(good + "{oops\n" + good)
    with pytest.raises(UserError, match=rf"{path}, line 2: not valid JSON"):
        read_metrics(path)
    path.write_text(good + '{"round": 1}\n')
    with pytest.raises(UserError, match=rf"{path}, line 2: expected an object with round, step and kind"):
        read_metrics(path)


def test_a_report_that_cannot_be_written_keeps_the_run_and_warns(tiny_task, tmp_path, caplog):
    from spinlm import train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "report").write_text("a file where the report folder goes")
    result = train(["preset=smoke", "trainer.rounds=1", "trainer.eval_before_training=false",
                    f"trainer.output_dir={run_dir}"])
    assert result.report is None and [r["round"] for r in result.rounds] == [1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "1"
    assert json.loads((run_dir / "rounds.json").read_text()) == result.rounds
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING" and r.name == "spinlm.main_spin"]
    assert warning.getMessage().startswith(f"the run in {run_dir} is complete and saved, but its report could not be "
                                           "written: FileExistsError")
    assert f"Retry with `spinlm report {run_dir}`" in warning.getMessage()


@pytest.mark.parametrize("name, text, message", [
    ("rounds.json", "[{\"round\": 1,", "rounds.json: not valid JSON"),
    ("rounds.json", "{\"round\": 1}", "rounds.json: expected a list of objects with a round field"),
    ("config.yaml", "a: [1,\n", "config.yaml: not valid YAML"),
])
def test_a_broken_run_file_is_named(tmp_path, name, text, message):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "step": 1, "kind": "train", "loss": 0.5}\n')
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=f"{tmp_path}/{message}"):
        write_report(tmp_path)


def test_round_table_text_aligns_columns_and_marks_missing_values():
    from spinlm.report import round_table_text

    table = [{"round": "start", "val_acc": 0.5}, {"round": 1, "val_acc": 0.625, "margins": 1.5, "time_s": 12.25}]
    assert round_table_text(table).splitlines() == [
        "round  val_acc  margins  accuracies  logps_chosen  sample_reward   time_s",
        "start   0.5000        -           -             -              -        -",
        "    1   0.6250   1.5000           -             -              -  12.2500"]
