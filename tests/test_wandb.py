"""``tracking: [wandb]`` (issue 27 §2): offline without an API key, read back from the run's ``.wandb`` file.

wandb 0.31 writes every run — offline too — as a transaction log, ``run-<id>.wandb``: a LevelDB-style log
(a 7-byte ``:W&B`` header, 32 KiB blocks of CRC-checked chunks) of ``wandb.proto.wandb_internal_pb2.Record``
messages, which is exactly what ``wandb sync`` uploads. Its Python reader (``wandb.sdk.internal.datastore``)
is gone from 0.31 (the Go core reads the log now), so ``read_records`` below frames the chunks and decodes
them with wandb's own protobuf schema. Every test runs with no API key, no netrc, ``WANDB_*`` folders in
tmp and ``WANDB_BASE_URL`` pointing at a closed port: nothing touches the network.
"""

from __future__ import annotations

import io
import json
import struct
import time
import zlib  # noqa: F401 - kept for readers who want to check the CRCs (crc32c is not in the stdlib)
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from wandb.proto import wandb_internal_pb2

from transferlab.config import ConfigError, parse_study
from transferlab.engine import Callback
from transferlab.files import read_json
from transferlab.kinds import run_experiment
from transferlab.results.trackers import WandbOptions, WandbTracker, api_key_configured, wandb_mode
from transferlab.rundir.layout import TRACKING_FILE

DATA = {"dataset": "digits", "train_subset": 200, "test_subset": 60, "val_fraction": 0.2}  # 160 train images
TRAIN = {"epochs": 2, "batch_size": 40, "lr": 0.01, "progress": False, "accelerator": "cpu"}  # 4 steps per epoch
STEPS = 4
BLOCK = 32768


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    """No API key, no netrc, every W&B folder in tmp, silent, and a W&B host that refuses connections."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    for key, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # online would fail fast here, never reach the internet


def quiet() -> Console:
    return Console(file=io.StringIO(), width=300)


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The records of a ``.wandb`` transaction log (module docstring)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    payloads, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # FULL
            payloads.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            payloads.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(p) for p in payloads]


def offline_run(folder: Path, timeout: float = 60.0) -> dict[str, Any]:
    """What an offline run holds, from its records: id, config, history rows, summary, artifacts, files.

    ``run.finish()`` hands the last records to W&B's service process, which writes them a moment later:
    wait (up to ``timeout`` s) for the ``exit`` record that ends a finished run's log.
    """
    deadline = time.monotonic() + timeout
    while True:
        out = _read_offline_run(folder)
        if out["exit"] is not None or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _read_offline_run(folder: Path) -> dict[str, Any]:
    (log,) = folder.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "artifacts": [], "files": [], "exit": None, "run": None}
    for rec in read_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({item.key: json.loads(item.value_json) for item in rec.run.config.update})
        elif kind == "config":
            out["config"].update({item.key: json.loads(item.value_json) for item in rec.config.update})
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            out["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            out["artifacts"].append((rec.artifact.type, sorted(e.path for e in rec.artifact.manifest.contents)))
        elif kind == "files":
            out["files"] += [f.path for f in rec.files.files]
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


class StopAt(Callback):
    """Ctrl-C at (epoch, step): an interrupted run that ``--resume`` continues."""

    def __init__(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def on_train_batch_end(self, loop) -> None:
        if loop.state.epoch == self.epoch and loop.state.step == self.step:
            raise KeyboardInterrupt


def test_without_a_key_the_run_is_logged_offline_like_mlflow(make_cfg, tmp_path):
    assert not api_key_configured() and wandb_mode(WandbOptions()) == "offline"
    cfg = make_cfg(name="a", data=DATA, train=TRAIN, tracking={"wandb": {"log_model": "safetensors"}})
    study_dir = tmp_path / "runs" / "wb"
    console = quiet()
    metrics = run_experiment(cfg, study_dir / "a", console=console)
    assert metrics["status"] == "ok"
    rec = read_json(study_dir / "a" / TRACKING_FILE)["wandb"]
    folder = Path(rec["folder"])
    assert rec["mode"] == "offline" and rec["project"] == "wb" and folder.parent == study_dir / "wandb"
    assert folder.name.startswith("offline-run-") and folder.name.endswith(rec["run_id"])
    assert "wandb runs offline" in console.file.getvalue() and "wandb sync" in console.file.getvalue()

    run = offline_run(folder)
    assert run["run"].run_id == rec["run_id"] and run["run"].project == "wb" and run["run"].run_group == "wb"
    assert run["config"]["train.lr"] == 0.01 and run["config"]["model.backbone"] == "transferlab_cnn"  # the params MLflow gets
    assert {"train", "finetune", "transferlab_cnn", "scratch"} <= set(run["run"].tags)
    steps = [r["trainer/global_step"] for r in run["history"] if "train/loss_step" in r]
    assert steps == list(range(1, 2 * STEPS + 1))
    epochs = [r for r in run["history"] if "val/acc" in r]
    assert [r["trainer/global_step"] for r in epochs] == [STEPS, 2 * STEPS] and all("train/loss" in r for r in epochs)
    assert run["summary"]["test/acc"] == pytest.approx(metrics["test_acc"]) and run["summary"]["status"] == "ok"
    images = [r for r in run["history"] if "test/confusion_matrix/_type" in r]  # a wandb.Image: a nested history value
    assert images and images[0]["test/confusion_matrix/_type"] == "image-file"
    assert any(f.startswith("media/images/test/confusion_matrix") and f.endswith(".png") for f in run["files"])
    assert (folder / "files" / images[0]["test/confusion_matrix/path"]).is_file()
    assert ("run-files", ["config.yaml", "history.csv", "metrics.json"]) in run["artifacts"]
    # log_model: the parity-checked export and its report, as MLflow's log_model uploads them
    assert ("model", ["model.json", "model.safetensors", "model.safetensors.parity.json"]) in run["artifacts"]
    assert run["summary"]["model_parity"] == "ok"
    assert run["exit"] == 0


def test_resume_continues_the_same_wandb_run(make_cfg, tmp_path):
    cfg = make_cfg(name="a", data=DATA, train={**TRAIN, "epochs": 3, "checkpoint_every_steps": 2}, tracking=["wandb"])
    run_dir = tmp_path / "runs" / "wb" / "a"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, run_dir, console=quiet(), callbacks=[StopAt(1, 3)])
    first = read_json(run_dir / TRACKING_FILE)["wandb"]
    assert offline_run(Path(first["folder"]))["exit"] not in (None, 0)
    assert run_experiment(cfg, run_dir, resume=True, console=quiet())["status"] == "ok"
    second = read_json(run_dir / TRACKING_FILE)["wandb"]
    assert second["run_id"] == first["run_id"]  # the same W&B run: `wandb sync` appends the second folder to it
    resumed = offline_run(Path(second["folder"]))
    assert resumed["run"].run_id == first["run_id"] and resumed["exit"] == 0
    assert [r["trainer/global_step"] for r in resumed["history"] if "val/acc" in r][-1] == 3 * STEPS


def test_a_failing_wandb_never_fails_the_run(make_cfg, tmp_path, monkeypatch):
    def broken(self, row, step):
        raise OSError("No space left on device")

    monkeypatch.setattr(WandbTracker, "log_epoch", broken)
    console = quiet()
    metrics = run_experiment(make_cfg(name="a", data=DATA, train=TRAIN, tracking=["wandb"]), tmp_path / "runs" / "s" / "a", console=console)
    assert metrics["status"] == "ok" and console.file.getvalue().count("tracking: wandb is off") == 1


def test_online_with_an_unreachable_host_turns_wandb_off_in_seconds(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert api_key_configured() and wandb_mode(WandbOptions()) == "online"
    console = quiet()
    metrics = run_experiment(make_cfg(name="a", data=DATA, train=TRAIN, tracking=["wandb"]), tmp_path / "runs" / "s" / "a", console=console)
    out = console.file.getvalue()
    assert metrics["status"] == "ok" and "tracking: wandb is off" in out and "127.0.0.1:9" in out


def test_a_netrc_entry_counts_as_a_key(tmp_path, monkeypatch):
    (tmp_path / "home" / ".netrc").write_text("machine 127.0.0.1\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / "home" / ".netrc").chmod(0o600)
    assert api_key_configured() and wandb_mode(WandbOptions()) == "online"
    assert wandb_mode(WandbOptions(mode="offline")) == "offline"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode(WandbOptions()) == "offline"


def test_options_are_checked():
    study = {"study": "s", "defaults": {"data": {"dataset": "synthetic"}},
             "experiments": [{"name": "a", "tracking": {"wandb": {"mode": "sometimes"}}}]}
    with pytest.raises(ConfigError, match=r"tracking.wandb.mode='sometimes' must be one of 'auto', 'online', 'offline'"):
        parse_study(study, "s.yaml")
