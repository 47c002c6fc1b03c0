"""``tracking: [mlflow]`` — one MLflow experiment per study, a parent run per study, one nested run per transferlab run.

Tracking URI: ``tracking: {mlflow: {tracking_uri: ...}}``, else ``$MLFLOW_TRACKING_URI``, else a SQLite
database in the study folder, ``sqlite:///runs/<study>/mlflow.db`` (artifacts beside it in
``runs/<study>/mlartifacts``; ``mlflow ui --backend-store-uri sqlite:///runs/<study>/mlflow.db`` shows it).

A run logs: params = the flattened resolved config; tags kind, strategy, backbone, weights, seed,
git commit, and its source (``mlflow.source.name``: the study file that was run;
``mlflow.source.type``: ``JOB`` under Slurm, else ``LOCAL``), which the runs table shows; per-epoch
``train_loss``, ``train_acc``, ``val_loss``, ``val_acc`` (multi-label: ``val_map``), ``lr``, ``seconds`` with step =
epoch; the test metrics (multi-label: ``test_map``, ``test_map_micro``, ``test_f1``, … in place of ``test_acc``);
artifacts ``config.yaml``, ``metrics.json``, ``history.csv`` and ``confusion_matrix.png``; with ``log_model: onnx``
(or ``safetensors``) the model, exported and parity-checked after the run (``results.export.export_checkpoint``), as
``model/<file>`` with its ``<file>.parity.json``. Only ``MlflowClient`` is used (no fluent API, whose "active run" is global
state): several runs in one process, threads or workers never mix.

The study's parent run is found or created by whichever run of the study comes first, under a file
lock in the study folder, and recorded in ``runs/<study>/mlflow_parent.json``: parallel workers share
one parent. The run's id is recorded in its ``tracking.json``, so ``--resume`` continues the same
MLflow run and logs only the epochs it does not have yet.

Files made after the study (the report, written above this layer) are logged to the parent run by
``log_study_artifacts(study_dir, paths)``, which reads ``mlflow_parent.json``: ``transferlab run``
calls it with ``report.html`` and ``report.md``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from transferlab.engine.tracking import TRACKERS, RunInfo, Tracker, confusion_image, flat_config, missing_modules, strategy_label
from transferlab.files import read_json, write_json
from transferlab.results.export import EXPORT_FORMATS, ExportParityError, export_checkpoint, parity_path
from transferlab.results.trackers.fields import MULTILABEL_EPOCH_METRICS, MULTILABEL_TEST_METRICS
from transferlab.rundir.layout import checkpoint_path

try:
    import fcntl
except ImportError:  # no fcntl (Windows): the parent run is found or created unlocked
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOG_MODEL_FORMATS", "MlflowOptions", "MlflowTracker", "PARENT_FILE", "log_study_artifacts", "tracking_uri"]

PARENT_FILE = "mlflow_parent.json"
"""In the study folder: the study's MLflow experiment and parent run, per tracking URI."""

EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", *MULTILABEL_EPOCH_METRICS, "lr", "seconds")
TEST_METRICS = ("test_acc", "test_top5", "test_loss", *MULTILABEL_TEST_METRICS, "best_val", "train_seconds", "wall_seconds",
                "inference_images_per_s", "total_params", "trainable_params")
ARTIFACTS = ("config.yaml", "metrics.json", "history.csv")
REACH_TIMEOUT_S = 3.0
"""How long an ``http(s)`` tracking server may take to accept a connection before tracking is off."""
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
LOG_MODEL_FORMATS = ("none", "onnx", "safetensors")
"""``tracking.mlflow.log_model``: the export format of the model logged with each run (``none``: no model)."""
MODEL_ARTIFACT_DIR = "model"


@dataclass
class MlflowOptions:
    """``tracking: {mlflow: {...}}``."""

    tracking_uri: str | None = None
    """``http://host:5000``, ``sqlite:///path/mlflow.db``, ...; default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///runs/<study>/mlflow.db``."""
    experiment: str | None = None
    """MLflow experiment name; default the study name."""
    log_artifacts: bool = True
    """Upload ``config.yaml``, ``metrics.json``, ``history.csv`` and the confusion matrix image with every run."""
    log_model: str = "none"
    """``onnx`` or ``safetensors``: after a run that finished, export its model (parity-checked) and upload the file and
    its ``.parity.json`` under ``model/``; ``none``: no model."""


def tracking_uri(options: MlflowOptions, study_dir: Path) -> str:
    """The study file's URI, else ``$MLFLOW_TRACKING_URI``, else the SQLite database in ``study_dir``."""
    return options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{study_dir.resolve() / 'mlflow.db'}"


def _scheme(uri: str) -> str:
    return urllib.parse.urlparse(uri).scheme.split("+")[0]  # postgresql+psycopg2 -> postgresql


def _check_reachable(uri: str) -> None:
    """A down ``http(s)`` server is noticed in seconds here, not after MLflow's retries with backoff."""
    u = urllib.parse.urlparse(uri)
    if u.scheme not in ("http", "https"):
        return
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "localhost", port), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot reach the MLflow server {uri} ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def _study_lock(study_dir: Path) -> Iterator[None]:
    """Serialise finding or creating the study's experiment and parent run (also the SQLite database's creation)."""
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / ".mlflow_parent.lock", "a+") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # blocking: the other worker is done in seconds
        yield


@TRACKERS.register("mlflow")
class MlflowTracker(Tracker):
    """MLflow (MlflowClient): params, tags, per-epoch and test metrics, artifacts; a nested run per run under the study's parent."""

    name = "mlflow"
    extra = "mlflow"
    Options = MlflowOptions

    def __init__(self, run: RunInfo, options: MlflowOptions) -> None:
        super().__init__(run, options)
        self.uri = tracking_uri(options, run.study_dir)
        self.client: Any = None
        self.run_id = ""
        self.experiment_id = ""
        self.parent_id = ""
        self.logged_epochs: set[int] = set()

    @classmethod
    def modules(cls, options: MlflowOptions) -> tuple[str, ...]:
        # a database store needs SQLAlchemy and alembic besides mlflow(-skinny); a server does not
        db = _scheme(options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:") in _DB_SCHEMES
        return ("mlflow", "sqlalchemy", "alembic") if db else ("mlflow",)

    @classmethod
    def check(cls, options: MlflowOptions) -> str | None:
        if options.log_model not in LOG_MODEL_FORMATS:
            return f"log_model={options.log_model!r} must be one of {', '.join(map(repr, LOG_MODEL_FORMATS))}"
        if options.log_model != "none":
            fmt = EXPORT_FORMATS.get(options.log_model)
            if missing := missing_modules(fmt.requires):
                return f"log_model={options.log_model} needs {', '.join(missing)}, which is not installed: pip install 'transferlab[{fmt.extra}]'"
        return None

    # ----------------------------------------------------------------------------------------
    # the study's experiment and parent run

    def _artifact_location(self) -> str | None:
        """Artifacts of a SQLite store go beside the database (else MLflow would put them under the current folder)."""
        if _scheme(self.uri) != "sqlite":
            return None  # a server or another database: its own default
        db = Path(urllib.parse.urlparse(self.uri).path)
        return (db.parent / "mlartifacts").resolve().as_uri()

    def _find_parent(self) -> tuple[str, str]:
        """(experiment id, parent run id) of this study: recorded, else found by tag, else created."""
        client, study_dir = self.client, self.run.study_dir
        name = self.options.experiment or self.run.study
        key = f"{self.uri} {name}"
        path = study_dir / PARENT_FILE
        with _study_lock(study_dir):
            records = read_json(path) if path.is_file() else {}
            rec = records.get(key)
            if rec and self._alive(rec["parent_run_id"]):
                return rec["experiment_id"], rec["parent_run_id"]
            exp = client.get_experiment_by_name(name)
            if exp is None:
                exp_id = client.create_experiment(name, artifact_location=self._artifact_location(), tags={"transferlab.study": self.run.study})
            else:
                exp_id = exp.experiment_id
                if exp.lifecycle_stage == "deleted":
                    client.restore_experiment(exp_id)
            where = str(study_dir.resolve()).replace("'", "")
            found = client.search_runs(
                [exp_id], f"tags.`transferlab.role` = 'study' AND tags.`transferlab.study_dir` = '{where}'", max_results=1
            )
            if found:
                parent_id = found[0].info.run_id
            else:
                tags = {"transferlab.role": "study", "transferlab.study": self.run.study, "transferlab.study_dir": where}
                parent_id = client.create_run(exp_id, run_name=self.run.study, tags=tags).info.run_id
                if self.options.log_artifacts and (study_dir / "study.yaml").is_file():
                    client.log_artifact(parent_id, str(study_dir / "study.yaml"))
            records[key] = {"tracking_uri": self.uri, "experiment": name, "experiment_id": exp_id, "parent_run_id": parent_id}
            write_json(path, records)
            return exp_id, parent_id

    def _alive(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    # ----------------------------------------------------------------------------------------
    # the run

    def _tags(self) -> dict[str, str]:
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

        cfg = self.run.cfg
        commit = self.run.version().get("git_commit", "unknown")
        return {
            MLFLOW_PARENT_RUN_ID: self.parent_id,
            MLFLOW_GIT_COMMIT: commit.removesuffix("+dirty"),
            "git_commit": commit,
            "kind": cfg.kind,
            "strategy": strategy_label(cfg),
            "backbone": cfg.model.backbone,
            "weights": cfg.model.weights,
            "seed": str(cfg.seed),
            "experiment": cfg.name,
            "dataset": cfg.data.dataset,
            "transferlab.run_dir": str(self.run.run_dir.resolve()),
            MLFLOW_SOURCE_NAME: str(self._source()),
            MLFLOW_SOURCE_TYPE: "JOB" if os.environ.get("SLURM_JOB_ID") else "LOCAL",
        }

    def _source(self) -> Path:
        """The study file the run came from (``study.json``'s ``source``), else its copy in the study folder, else the run folder."""
        try:
            source = read_json(self.run.study_dir / "study.json").get("source")
        except (OSError, ValueError):
            source = None
        if source and Path(source).is_file():
            return Path(source).resolve()
        study_file = self.run.study_dir / "study.yaml"
        return (study_file if study_file.is_file() else self.run.run_dir).resolve()

    def start(self, resuming: bool, previous: dict[str, Any] | None) -> None:
        from mlflow import MlflowClient  # lazy: the optional extra

        _check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        if resuming and previous and previous.get("tracking_uri") == self.uri and self._alive(previous.get("run_id", "")):
            # --resume: the same MLflow run continues; epochs it already has are not logged again
            self.run_id, self.experiment_id = previous["run_id"], previous["experiment_id"]
            self.parent_id = previous.get("parent_run_id", "")
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged_epochs = {m.step for m in self.client.get_metric_history(self.run_id, "val_loss")}
        else:
            self.experiment_id, self.parent_id = self._find_parent()
            self.run_id = self.client.create_run(self.experiment_id, run_name=self.run.name, tags=self._tags()).info.run_id
        self._log_params()

    def resolved(self) -> None:
        self._log_params()  # the keys the run lacked: train.lr, now a number

    def _log_params(self) -> None:
        """The flattened config; on resume only keys the run lacks (MLflow refuses to change a logged param)."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        have = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flat_config(self.run.cfg).items() if k not in have]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def record(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id, "parent_run_id": self.parent_id}

    def fit_start(self, first_step: int, steps_per_epoch: int, history: list[dict[str, float]]) -> None:
        for row in history:  # a resumed run: epochs its MLflow run does not have yet (e.g. a new run)
            self.log_epoch(row, 0)

    def log_epoch(self, row: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        epoch = int(row["epoch"])
        if epoch in self.logged_epochs:
            return
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), now, epoch) for k in EPOCH_METRICS if row.get(k) is not None]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.logged_epochs.add(epoch)

    def finish(self, metrics: dict[str, Any] | None, error: BaseException | None) -> None:
        from mlflow.entities import Metric, RunTag
        from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

        if self.client is None:
            return
        ok = metrics is not None and metrics.get("status") == "ok"
        if metrics is not None:
            now = int(time.time() * 1000)
            values = [Metric(k, float(metrics[k]), now, 0) for k in TEST_METRICS if ok and _number(metrics.get(k))]
            # the run's own words for what ran (an ensemble's members, a probe's name)
            tags = [RunTag(k, str(metrics[k])) for k in ("strategy", "backbone", "weights") if metrics.get(k)]
            tags.append(RunTag("status", str(metrics.get("status"))))
            if metrics.get("error"):
                tags.append(RunTag("error", str(metrics["error"])[:MAX_TAG_VAL_LENGTH]))
            self.client.log_batch(self.run_id, metrics=values, tags=tags)
        if self.options.log_artifacts:
            for name in ARTIFACTS:
                if (self.run.run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(self.run.run_dir / name))
            if ok and metrics.get("confusion_matrix"):
                image = confusion_image(metrics["confusion_matrix"], metrics.get("class_names") or [])
                self.client.log_image(self.run_id, image, artifact_file="confusion_matrix.png")
        if ok and self.options.log_model != "none":
            self._log_model(metrics)
        # an interrupted run (Ctrl-C, a stopped trial) is KILLED: --resume continues it; an error FAILED
        status = "FINISHED" if ok else "FAILED" if isinstance(error, Exception) and not hasattr(error, "status") else "KILLED"
        self.client.set_terminated(self.run_id, status)
        if self.parent_id:
            self.client.set_terminated(self.parent_id, "FINISHED")  # the study's latest activity


    def _log_model(self, metrics: dict[str, Any]) -> None:
        """Export the run's model as ``log_model`` and upload it with its parity report; a problem is said, not raised."""
        fmt, cfg = EXPORT_FORMATS.get(self.options.log_model), self.run.cfg
        say = self.run.console.print
        if not cfg.uses.model or not checkpoint_path(self.run.run_dir).is_file():
            say(f"[yellow]tracking: mlflow logs no model for {escape(self.run.name)} (a {escape(cfg.kind)} run keeps no single model)[/]")
            return
        out = self.run.run_dir / "export" / fmt.filename
        try:
            files, verdict = [*export_checkpoint(self.run.run_dir, cfg, metrics, fmt, out).files, parity_path(out)], "ok"
        except ExportParityError as e:  # the file is kept and logged with the report that says what is wrong
            files, verdict = [out, parity_path(out)], "failed"
            say(f"[yellow]tracking: the {fmt.name} export of {escape(self.run.name)} failed its parity check ({escape(str(e)[:300])}); "
                "logged with its report, tagged model_parity=failed[/]")
        except Exception as e:  # noqa: BLE001 - the run is done; a model that does not export must not hide it
            say(f"[yellow]tracking: mlflow could not log the model of {escape(self.run.name)} "
                f"({escape(type(e).__name__)}: {escape(str(e).splitlines()[0][:300] if str(e) else '')})[/]")
            return
        for path in files:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), f"{MODEL_ARTIFACT_DIR}/{path.name}")
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), MODEL_ARTIFACT_DIR)
        self.client.set_tag(self.run_id, "model_format", fmt.name)
        self.client.set_tag(self.run_id, "model_parity", verdict)


def log_study_artifacts(study_dir: str | Path, paths: list[str | Path], console: Console | None = None) -> list[str]:
    """Upload ``paths`` (the study report) to the study's MLflow parent run(s) recorded in ``<study_dir>/mlflow_parent.json``.

    Returns the parent run ids they went to; ``[]`` when the study was not tracked with MLflow. Like all
    tracking it never raises: a problem is said once on ``console`` and the paths are left where they are.
    """
    study_dir = Path(study_dir)
    record = study_dir / PARENT_FILE
    files = [Path(p) for p in paths if Path(p).is_file()]
    if not record.is_file() or not files:
        return []
    done = []
    try:
        from mlflow import MlflowClient  # lazy: the optional extra (a study with a parent record has it)

        for rec in read_json(record).values():
            _check_reachable(rec["tracking_uri"])
            client = MlflowClient(tracking_uri=rec["tracking_uri"])
            for path in files:
                client.log_artifact(rec["parent_run_id"], str(path))
            done.append(rec["parent_run_id"])
    except Exception as e:  # noqa: BLE001 - tracking never fails a study
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        (console or Console(stderr=True)).print(
            f"[yellow]tracking: could not log {escape(', '.join(p.name for p in files))} to the study's MLflow run ({escape(reason)})[/]"
        )
    return done


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
