"""Tracking: TensorBoard and MLflow, read back with TensorBoard's ``EventAccumulator`` and ``MlflowClient``.

Runs are tiny (scikit-learn's digits, a few steps). Creating an MLflow SQLite database runs MLflow's
migrations (seconds), so one migrated database is made per session and copied into each study folder,
where the default tracking URI (``sqlite:///runs/<study>/mlflow.db``) finds it.
"""

from __future__ import annotations

import csv
import io
import shutil
import sys
import threading
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from transferlab.cli import main
from transferlab.config import ConfigError, config_from_yaml_text, parse_study
from transferlab.config.tracking import tracking_specs, with_tracking
from transferlab.engine import Callback
from transferlab.engine.tracking import RunInfo, RunTracking, flat_config
from transferlab.files import read_json
from transferlab.kinds import run_experiment
from transferlab.results.trackers import HPARAMS, MlflowOptions, MlflowTracker, TensorBoardTracker, log_study_artifacts
from transferlab.rundir import Opening, RunDir, RunError, code_version
from transferlab.rundir.layout import TRACKING_FILE

DATA = {"dataset": "digits", "train_subset": 200, "test_subset": 60, "val_fraction": 0.2}  # 160 train images
TRAIN = {"epochs": 2, "batch_size": 40, "lr": 0.01, "progress": False, "accelerator": "cpu"}  # 4 steps per epoch
STEPS = 4


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory) -> Path:
    """An empty MLflow SQLite database with MLflow's tables (made once: the migrations take seconds)."""
    db = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


def seed_db(template: Path, study_dir: Path) -> MlflowClient:
    study_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, study_dir / "mlflow.db")
    return MlflowClient(f"sqlite:///{study_dir.resolve() / 'mlflow.db'}")


def events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=300)


# --------------------------------------------------------------------------------------------
# a study, from the command line, with both trackers


def test_study_logs_to_tensorboard_and_mlflow(tmp_path, mlflow_db, capsys):
    study = {
        "study": "tracked",
        "tracking": ["tensorboard"],  # and mlflow from --track
        "defaults": {"data": DATA, "model": {"backbone": "transferlab_cnn"}, "train": TRAIN},
        "experiments": [{"name": "scratch", "strategy": {"name": "scratch"}}, {"name": "knn", "kind": "knn", "probe": {"k": [1, 3]}}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    runs = tmp_path / "runs"
    client = seed_db(mlflow_db, runs / "tracked")
    assert main(["run", str(path), "--runs-dir", str(runs), "--track", "mlflow", "--no-report"]) == 0
    assert "is off" not in capsys.readouterr().out

    run_dir = runs / "tracked" / "scratch"
    metrics = read_json(run_dir / "metrics.json")
    with open(run_dir / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    cfg = config_from_yaml_text((run_dir / "config.yaml").read_text(), "config.yaml")
    assert tracking_specs(cfg.tracking) == {"tensorboard": {}, "mlflow": {}}

    # TensorBoard: one log dir per run; one x axis (the global step)
    tb = events(runs / "tracked" / "tb" / "scratch")
    assert steps(tb, "train/loss_step") == steps(tb, "train/lr") == list(range(1, 2 * STEPS + 1))
    assert steps(tb, "val/acc") == [STEPS, 2 * STEPS]
    assert [e.value for e in tb.Scalars("val/acc")] == pytest.approx([float(r["val_acc"]) for r in history])
    assert [e.value for e in tb.Scalars("test/acc")] == pytest.approx([metrics["test_acc"]])
    image = tb.Images("test/confusion_matrix")
    assert len(image) == 1 and image[0].width > 100
    hp = plugin_data_pb2.HParamsPluginData.FromString(tb.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hp.session_start_info.hparams["train.lr"].number_value == pytest.approx(0.01)
    assert hp.session_start_info.hparams["strategy.name"].string_value == "scratch"
    # only the settings that tell runs apart are hparams (the HPARAMS table's columns); the whole config is text
    assert set(hp.session_start_info.hparams) == set(HPARAMS)
    text = tb.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| `data.dataset` | `digits` |" in text and "| `train.optimizer` | `adamw` |" in text
    knn_tb = events(runs / "tracked" / "tb" / "knn")  # a kind that does not train: hparams and test metrics
    assert [e.value for e in knn_tb.Scalars("test/acc")] == pytest.approx([read_json(runs / "tracked" / "knn" / "metrics.json")["test_acc"]])

    # MLflow: an experiment per study, a parent run per study, a nested run per run
    exp = client.get_experiment_by_name("tracked")
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(found) == {"tracked", "scratch", "knn"}
    parent = found["tracked"]
    assert parent.data.tags["transferlab.role"] == "study"
    assert read_json(runs / "tracked" / "mlflow_parent.json")[f"sqlite:///{(runs / 'tracked').resolve() / 'mlflow.db'} tracked"][
        "parent_run_id"] == parent.info.run_id
    run = found["scratch"]
    assert run.info.status == "FINISHED"
    assert run.info.run_id == read_json(run_dir / TRACKING_FILE)["mlflow"]["run_id"]
    assert run.data.tags["mlflow.parentRunId"] == found["knn"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    tags = run.data.tags
    assert [tags[k] for k in ("kind", "strategy", "backbone", "weights", "seed")] == ["train", "scratch", "transferlab_cnn", "scratch", "0"]
    assert tags["git_commit"] == code_version().get("git_commit", "unknown")
    # a source, as MLflow's runs table shows it: the study file that was run, locally
    assert tags["mlflow.source.name"] == str(path.resolve()) and tags["mlflow.source.type"] == "LOCAL"
    assert run.data.params == {k: str(v) for k, v in flat_config(cfg).items()}
    val = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in val] == [1, 2]
    assert [m.value for m in val] == pytest.approx([float(r["val_acc"]) for r in history])
    assert run.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
    assert {f.path for f in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "metrics.json", "history.csv", "confusion_matrix.png"}
    copied = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert read_json(Path(copied)) == metrics
    knn = found["knn"]
    assert knn.data.tags["kind"] == knn.data.tags["strategy"] == "knn"
    assert knn.data.metrics["test_acc"] == pytest.approx(read_json(runs / "tracked" / "knn" / "metrics.json")["test_acc"])
    assert knn.data.params["probe.k"] == "[1, 3]"


# --------------------------------------------------------------------------------------------
# --resume continues the same tracker runs, no step twice


class StopAt(Callback):
    """Ctrl-C after a given step of a given epoch (both counted from the loop's state)."""

    def __init__(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def on_train_batch_end(self, loop) -> None:
        if loop.state.epoch == self.epoch and loop.state.step == self.step:
            raise KeyboardInterrupt


def test_resume_continues_the_same_runs_without_duplicates(make_cfg, tmp_path, mlflow_db):
    cfg = make_cfg(name="a", data=DATA, train={**TRAIN, "epochs": 3, "checkpoint_every_steps": 2}, tracking=["tensorboard", "mlflow"])
    study_dir = tmp_path / "runs" / "resumed"
    client = seed_db(mlflow_db, study_dir)
    run_dir = study_dir / "a"
    with pytest.raises(KeyboardInterrupt):  # in epoch 2 after step 3: the last checkpoint is at its step 2
        run_experiment(cfg, run_dir, console=quiet(), callbacks=[StopAt(1, 3)])
    first = read_json(run_dir / TRACKING_FILE)["mlflow"]["run_id"]
    assert client.get_run(first).info.status == "KILLED"
    assert steps(events(study_dir / "tb" / "a"), "train/loss_step") == list(range(1, STEPS + 4))

    assert run_experiment(cfg, run_dir, resume=True, console=quiet())["status"] == "ok"
    assert read_json(run_dir / TRACKING_FILE)["mlflow"]["run_id"] == first
    exp = client.get_experiment_by_name("resumed")
    assert len(client.search_runs([exp.experiment_id])) == 2  # the parent and one run
    assert client.get_run(first).info.status == "FINISHED"
    for key in ("val_acc", "train_loss"):
        assert [m.step for m in client.get_metric_history(first, key)] == [1, 2, 3]
    tb = events(study_dir / "tb" / "a")  # steps the interrupted run logged past its checkpoint are purged, then logged again
    assert steps(tb, "train/loss_step") == list(range(1, 3 * STEPS + 1))
    assert steps(tb, "val/acc") == [STEPS, 2 * STEPS, 3 * STEPS]


def test_lr_find_logs_the_lr_the_run_trained_with(make_cfg, tmp_path, mlflow_db):
    """``train.lr: find``: MLflow's param and TensorBoard's hparam are the finder's number, never the word ``find``."""
    cfg = make_cfg(name="f", data=DATA, train={**TRAIN, "lr": "find", "lr_find": {"steps": 20}}, tracking=["tensorboard", "mlflow"])
    assert "train.lr" not in flat_config(cfg)  # not known yet
    study_dir = tmp_path / "runs" / "found"
    client = seed_db(mlflow_db, study_dir)
    m = run_experiment(cfg, study_dir / "f", console=quiet())
    assert m["status"] == "ok"
    lr = m["lr_find"]["suggestion"]
    run = client.get_run(read_json(study_dir / "f" / TRACKING_FILE)["mlflow"]["run_id"])
    assert float(run.data.params["train.lr"]) == pytest.approx(lr) and float(run.data.params["train.lr_find.found"]) == pytest.approx(lr)
    tb = events(study_dir / "tb" / "f")
    hp = plugin_data_pb2.HParamsPluginData.FromString(tb.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hp.session_start_info.hparams["train.lr"].number_value == pytest.approx(lr)


# --------------------------------------------------------------------------------------------
# tracking never fails a run


def test_unreachable_server_and_failing_tracker_never_fail_the_run(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")

    def full_disk(self, row, step):
        raise OSError("No space left on device")

    monkeypatch.setattr(TensorBoardTracker, "log_epoch", full_disk)
    cfg = make_cfg(name="a", data=DATA, train=TRAIN, tracking={"mlflow": {"tracking_uri": "http://127.0.0.1:9"}, "tensorboard": None})
    console = quiet()
    metrics = run_experiment(cfg, tmp_path / "runs" / "s" / "a", console=console)
    assert metrics["status"] == "ok" and metrics["epochs_run"] == 2
    out = console.file.getvalue()
    assert out.count("tracking: mlflow is off") == 1 and "http://127.0.0.1:9" in out
    assert out.count("tracking: tensorboard is off") == 1 and "No space left on device" in out  # every epoch failed: said once


# --------------------------------------------------------------------------------------------
# config: names, options, packages, the study default, --track, --resume


def _study(default, **experiment):
    """A study whose top-level ``tracking`` is ``default``; ``experiment`` are more keys of its first experiment."""
    return {"study": "s", "tracking": default, "defaults": {"data": {"dataset": "synthetic"}},
            "experiments": [{"name": "a", **experiment}, {"name": "b"}]}


@pytest.mark.parametrize("name", ["mlflow", "tensorboard", "wandb"])
def test_missing_package_is_an_error_before_any_work(name, make_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ConfigError, match=rf"s.yaml: experiment 'a': tracking: {name} needs {name}.*pip install 'transferlab\[{name}\]'"):
        parse_study(_study([name]), "s.yaml")
    cfg = make_cfg(name="a")
    cfg.tracking = [name]  # never validated: run_experiment refuses it before it touches the run directory
    with pytest.raises(ConfigError, match=rf"pip install 'transferlab\[{name}\]'"):
        run_experiment(cfg, tmp_path / "runs" / "s" / "a", console=quiet())
    assert not (tmp_path / "runs").exists()


def test_tracker_names_and_options_are_checked():
    with pytest.raises(ConfigError, match=r"s.yaml: experiment 'a': tracking: 'tensorbord' is not one of .*\(did you mean 'tensorboard'\?\)"):
        parse_study(_study(["tensorbord"]), "s.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'tracking.mlflow.trackin_uri' \(did you mean 'tracking_uri'\?\)"):
        parse_study(_study({"mlflow": {"trackin_uri": "http://x"}}), "s.yaml")
    with pytest.raises(ConfigError, match=r"tracking.tensorboard.log_every_steps=0 must be >= 1"):
        parse_study(_study({"tensorboard": {"log_every_steps": 0}}), "s.yaml")
    with pytest.raises(ConfigError, match=r"s.yaml: tracking: expected a list"):
        parse_study(_study("mlflow"), "s.yaml")
    with pytest.raises(ConfigError, match="given twice"):
        parse_study({**_study(["mlflow"]), "defaults": {"tracking": ["mlflow"]}}, "s.yaml")


def test_study_default_experiment_override_and_track():
    study = parse_study(_study({"mlflow": {"tracking_uri": "http://x:5000"}}, tracking=[]), "s.yaml")
    a, b = study.experiments
    assert tracking_specs(a.tracking) == {}  # its own `tracking` replaces the study's
    assert tracking_specs(b.tracking) == {"mlflow": {"tracking_uri": "http://x:5000"}}
    tracked = with_tracking(study, ["tensorboard", "mlflow"])  # --track keeps the study file's options
    assert tracking_specs(tracked.experiments[0].tracking) == {"tensorboard": {}, "mlflow": {}}
    assert tracking_specs(tracked.experiments[1].tracking) == {"mlflow": {"tracking_uri": "http://x:5000"}, "tensorboard": {}}
    assert tracking_specs(study.experiments[1].tracking) == {"mlflow": {"tracking_uri": "http://x:5000"}}  # a copy
    with pytest.raises(ConfigError, match=r"--track mlfow: .*did you mean 'mlflow'"):
        with_tracking(study, ["mlfow"])


def test_track_typo_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"study": "s", "experiments": [{"name": "a", "data": {"dataset": "synthetic"}}]}))
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--track", "mlfow"]) == 2
    assert "--track mlfow" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_changing_tracking_does_not_block_resume(make_cfg, tmp_path):
    rundir = RunDir(tmp_path / "a")
    rundir.begin(Opening(), make_cfg(name="a").to_dict())
    changed = make_cfg(name="a", tracking={"mlflow": {"tracking_uri": "http://x:5000"}, "tensorboard": None})
    harmless = rundir.check_config(changed.to_dict(), finished=False)
    assert harmless and all(c.key.startswith("tracking.") for c in harmless)
    with pytest.raises(RunError, match="train.lr"):  # the check itself still works
        rundir.check_config(make_cfg(name="a", train={"lr": 0.5}).to_dict(), finished=False)


def test_only_rank_zero_tracks(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(tracking=["tensorboard", "mlflow"])
    assert RunTracking.for_run(cfg, tmp_path / "a", quiet()).hooks()
    monkeypatch.setenv("RANK", "1")
    tracking = RunTracking.for_run(cfg, tmp_path / "a", quiet())
    assert not tracking and tracking.hooks() == []


def test_parallel_runs_share_one_parent(make_cfg, tmp_path, mlflow_db):
    study_dir = tmp_path / "runs" / "par"
    client = seed_db(mlflow_db, study_dir)
    trackers = [MlflowTracker(RunInfo(make_cfg(name=f"r{i}"), study_dir / f"r{i}", quiet()), MlflowOptions()) for i in range(3)]
    threads = [threading.Thread(target=t.start, args=(False, None)) for t in trackers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(t.run_id for t in trackers)
    assert len({t.parent_id for t in trackers}) == 1
    exp = client.get_experiment_by_name("par")
    assert len(client.search_runs([exp.experiment_id], "tags.`transferlab.role` = 'study'")) == 1
    assert client.get_run(trackers[0].run_id).data.params["train.lr"] == "0.01"


# --------------------------------------------------------------------------------------------
# artifacts after the run: the study report on the parent run, the exported model on the run


def test_report_goes_to_the_parent_run_and_log_model_onnx_to_the_run(tmp_path, mlflow_db):
    study = {
        "study": "arts",
        "tracking": {"mlflow": {"log_model": "onnx"}},
        "defaults": {"data": DATA, "model": {"backbone": "transferlab_cnn"}, "train": {**TRAIN, "epochs": 1}},
        "experiments": [{"name": "scratch", "strategy": {"name": "scratch"}}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    runs = tmp_path / "runs"
    client = seed_db(mlflow_db, runs / "arts")
    assert main(["run", str(path), "--runs-dir", str(runs)]) == 0  # with the report

    exp = client.get_experiment_by_name("arts")
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent, run = found["arts"], found["scratch"]
    assert {f.path for f in client.list_artifacts(parent.info.run_id)} >= {"report.html", "report.md", "study.yaml"}
    copied = client.download_artifacts(parent.info.run_id, "report.md", str(tmp_path / "dl"))
    assert Path(copied).read_text() == (runs / "arts" / "report.md").read_text()
    assert {f.path for f in client.list_artifacts(run.info.run_id, "model")} == {"model/model.onnx", "model/model.onnx.parity.json"}
    parity = read_json(Path(client.download_artifacts(run.info.run_id, "model/model.onnx.parity.json", str(tmp_path / "dl"))))
    assert parity["ok"] is True and parity["format"] == "onnx"
    assert run.data.tags["model_format"] == "onnx" and run.data.tags["model_parity"] == "ok"
    assert run.info.status == "FINISHED"


def test_log_study_artifacts_without_mlflow_tracking_does_nothing(tmp_path):
    (tmp_path / "report.md").write_text("x")
    assert log_study_artifacts(tmp_path, [tmp_path / "report.md"]) == []


def test_log_model_option_is_checked(monkeypatch):
    with pytest.raises(ConfigError, match=r"tracking.mlflow.log_model='pt' must be one of 'none', 'onnx', 'safetensors'"):
        parse_study(_study({"mlflow": {"log_model": "pt"}}), "s.yaml")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"tracking.mlflow.log_model=onnx needs onnxruntime.*pip install 'transferlab\[onnx\]'"):
        parse_study(_study({"mlflow": {"log_model": "onnx"}}), "s.yaml")
    parse_study(_study({"mlflow": {"log_model": "safetensors"}}), "s.yaml")


# --------------------------------------------------------------------------------------------
# every executor: runs in worker processes share one parent


def test_local_executor_workers_share_one_parent_and_log_one_run_each(tmp_path, mlflow_db):
    study = {
        "study": "workers",
        "tracking": ["mlflow", "tensorboard"],
        "executor": {"name": "local", "workers": 2},
        "defaults": {"data": DATA, "model": {"backbone": "transferlab_cnn"}, "train": {**TRAIN, "epochs": 1}},
        "experiments": [{"name": "a", "strategy": {"name": "scratch"}}, {"name": "b", "strategy": {"name": "scratch"}, "seed": 1}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    runs = tmp_path / "runs"
    client = seed_db(mlflow_db, runs / "workers")
    assert main(["run", str(path), "--runs-dir", str(runs), "--no-report"]) == 0

    exp = client.get_experiment_by_name("workers")
    found = client.search_runs([exp.experiment_id])
    parents = [r for r in found if r.data.tags.get("transferlab.role") == "study"]
    assert len(parents) == 1, [r.info.run_name for r in found]
    children = sorted((r for r in found if r not in parents), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in children] == ["a", "b"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id and r.info.status == "FINISHED" for r in children)
    for r in children:
        assert r.info.run_id == read_json(runs / "workers" / r.info.run_name / TRACKING_FILE)["mlflow"]["run_id"]
        assert steps(events(runs / "workers" / "tb" / r.info.run_name), "val/acc") == [STEPS]
    assert sorted(p.name for p in (runs / "workers" / "tb").iterdir()) == ["a", "b"]
