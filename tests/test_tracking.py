"""The optional trackers (TensorBoard, MLflow, W&B offline) hold the same numbers as metrics.jsonl: one real smoke
round logs to all of them, and each is read back with its own library (W&B's offline file with its protobuf)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from spinlm.config import load_config
from spinlm.errors import UserError
from spinlm.main_spin import run
from spinlm.tracking import Tracker, mlflow_name

TRAIN_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "train/lr")


@pytest.fixture(scope="module")
def tracked_run(tiny_task, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")  # no network, no account
        env.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing written outside the test
            env.setenv(name, str(run_dir.parent / "wandb_home"))
        env.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file store in the run directory
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        run(load_config(["preset=smoke", f"trainer.output_dir={run_dir}", "trainer.rounds=1",
                         "trainer.eval_before_training=false", "trainer.logger=[jsonl,tensorboard,mlflow,wandb]"]))
    return run_dir


def jsonl_rows(run_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_tensorboard_events_hold_the_jsonl_values(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"))
    events.Reload()
    train = jsonl_rows(tracked_run, "train")
    assert len(train) == 2
    for key in TRAIN_KEYS:
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == {r["step"]: pytest.approx(r[key], rel=1e-6, abs=1e-12) for r in train}, key  # float32
    val = jsonl_rows(tracked_run, "val")[-1]
    assert [(e.step, e.value) for e in events.Scalars("val/acc")] == [(val["step"], pytest.approx(val["val/acc"]))]


def test_mlflow_run_holds_the_jsonl_values(tracked_run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("spinlm").experiment_id])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "run"
    assert mlflow_run.data.params["algorithm.mode"] == "spin" and mlflow_run.data.params["trainer.rounds"] == "1"
    train = jsonl_rows(tracked_run, "train")
    for key in TRAIN_KEYS:
        history = client.get_metric_history(mlflow_run.info.run_id, mlflow_name(key))
        assert sorted((m.step, m.value) for m in history) == [(r["step"], r[key]) for r in train], key
    # "val/acc" and "val/acc/tiny_arith" live side by side (the file store would refuse the slash names)
    val = jsonl_rows(tracked_run, "val")[-1]
    assert mlflow_run.data.metrics["val.acc"] == val["val/acc"]
    assert mlflow_run.data.metrics["val.acc.tiny_arith"] == val["val/acc/tiny_arith"]


def wandb_records(path: Path):
    """The records of an offline W&B run file: LevelDB log framing (7-byte header ':W&B' 0xBEE1 v0, then 32 KiB
    blocks of chunks: crc32, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4), each record a wandb protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_jsonl_values(tracked_run):
    (run_file,) = (tracked_run / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(run_file))
    by_step = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            by_step[r.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                           for i in r.history.item}
    train = jsonl_rows(tracked_run, "train")
    for key in TRAIN_KEYS:
        assert {r["step"]: by_step[r["step"]][key] for r in train} == {r["step"]: r[key] for r in train}, key
    assert all(by_step[r["step"]]["round"] == 1 for r in train)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds and next(r for r in records if r.HasField("exit")).exit.exit_code == 0
    config = {i.key: json.loads(i.value_json) for i in next(r for r in records if r.HasField("run")).run.config.update}
    assert config["algorithm"]["mode"] == "spin" and config["trainer"]["rounds"] == 1


def test_wandb_without_an_account_says_how_to_log_offline(tmp_path, monkeypatch):
    import wandb

    wandb.teardown()  # W&B keeps the settings of the process's first run (offline, above): start from none
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    with pytest.raises(UserError, match=r"trainer.logger contains wandb: .*set WANDB_MODE=offline"):
        Tracker(tmp_path, ["jsonl", "wandb"])


def test_mlflow_marks_a_failed_run_and_leaves_out_non_finite_values(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    tracker = Tracker(tmp_path, ["jsonl", "mlflow"], experiment="failing")
    tracker.log({"loss": 0.5, "train/grad_norm": 2.0}, round=1, step=1)
    tracker.log({"loss": float("nan"), "train/grad_norm": float("inf")}, round=1, step=2)  # a skipped step
    tracker.close(failed=True)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert mlflow_run.info.status == "FAILED"
    assert [(m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, "loss")] == [(1, 0.5)]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def expected_samples(run_dir: Path, tiny_task: Path) -> list[dict]:
    """The round's first trainer.log_samples=4 pairs, as rounds/1/pairs.parquet holds them."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_task / "sft_model")
    table = pq.read_table(run_dir / "rounds" / "1" / "pairs.parquet").to_pylist()[:4]
    return [{"prompt": tok.decode(r["prompt_ids"], skip_special_tokens=True), "chosen": r["chosen"],
             "rejected": r["rejected"], "chosen_score": r["chosen_score"], "rejected_score": r["rejected_score"]}
            for r in table]


def test_each_tracker_shows_the_rounds_sample_pairs(tracked_run, tiny_task):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    from spinlm.tracking import samples_markdown

    rows = expected_samples(tracked_run, tiny_task)
    assert len(rows) == 4 and all(r["chosen"] != r["rejected"] for r in rows)
    markdown = samples_markdown(rows, list(rows[0]))

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("samples/text_summary")
    assert make_ndarray(text.tensor_proto).item().decode() == markdown

    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("spinlm").experiment_id])
    local = client.download_artifacts(mlflow_run.info.run_id, "samples/round_1.md", str(tracked_run.parent))
    assert Path(local).read_text() == markdown

    (table_file,) = (tracked_run / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(rows[0]) and table["data"] == [list(r.values()) for r in rows]
