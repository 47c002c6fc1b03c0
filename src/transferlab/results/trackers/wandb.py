"""``tracking: [wandb]`` — one Weights & Biases run per transferlab run, grouped by study (``pip install 'transferlab[wandb]'``).

Online or offline (``mode``, default ``auto``): ``$WANDB_MODE`` when set, else **online** when an API
key is configured (``$WANDB_API_KEY``, or a ``~/.netrc`` / ``$NETRC`` entry for the W&B host that
``wandb login`` writes), else **offline**: nothing leaves the machine, and each run is written to
``<dir>/wandb/offline-run-<time>-<id>/`` (``dir`` defaults to the study folder, ``runs/<study>``), which
``wandb sync runs/<study>/wandb/offline-run-*`` uploads later. The run says which mode it took and where.

A run logs what the MLflow tracker logs: the flattened resolved config as the run's config (and kind,
strategy, backbone, weights as tags; the study as the group); the per-step ``train/loss_step`` and
``train/lr`` (``log_every_steps``) and per-epoch ``train/loss``, ``train/acc``, ``val/loss``,
``val/acc`` (multi-label: ``val/map``), ``lr``, ``seconds``, all against ``trainer/global_step`` (W&B's x axis for
every metric, so a resumed run can log steps again); the test metrics in the summary (multi-label: ``test/map``,
``test/map_micro``, ``test/f1``, … in place of ``test/acc``); the confusion matrix image
``test/confusion_matrix``; ``config.yaml``, ``metrics.json``, ``history.csv`` as a ``run-files`` artifact;
with ``log_model: onnx`` (or ``safetensors``) the parity-checked export and its report as a ``model``
artifact. The W&B run id is recorded in ``tracking.json``, so ``--resume`` continues the same W&B run.

Only run objects are used (``wandb.init(reinit="create_new")``, then ``run.log``), never the global
``wandb.log``: several runs in one process do not mix. As for every tracker, a W&B that is down or
missing never fails a run: an online host that does not accept a connection within seconds turns the
tracker off before ``wandb.init`` would wait for it.
"""

from __future__ import annotations

import netrc
import os
import secrets
import socket
import string
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from transferlab.engine.tracking import TRACKERS, RunInfo, Tracker, confusion_image, flat_config, missing_modules, strategy_label
from transferlab.results.export import EXPORT_FORMATS, ExportParityError, export_checkpoint, parity_path
from transferlab.results.trackers.fields import MULTILABEL_EPOCH_METRICS, MULTILABEL_TEST_METRICS
from transferlab.rundir.layout import checkpoint_path

__all__ = ["WANDB_MODES", "WandbOptions", "WandbTracker", "api_key_configured", "new_run_id", "wandb_mode"]

WANDB_MODES = ("auto", "online", "offline")
DEFAULT_HOST = "https://api.wandb.ai"
STEP_KEY = "trainer/global_step"
EPOCH_METRICS = {"train_loss": "train/loss", "train_acc": "train/acc", "val_loss": "val/loss", "val_acc": "val/acc",
                 **{k: k.replace("_", "/", 1) for k in MULTILABEL_EPOCH_METRICS}, "lr": "lr", "seconds": "seconds", "epoch": "epoch"}
TEST_METRICS = ("test_acc", "test_top5", "test_loss", *MULTILABEL_TEST_METRICS, "best_val", "train_seconds", "wall_seconds",
                "inference_images_per_s", "total_params", "trainable_params")
ARTIFACTS = ("config.yaml", "metrics.json", "history.csv")
REACH_TIMEOUT_S = 3.0
INIT_TIMEOUT_S = 30.0


@dataclass
class WandbOptions:
    """``tracking: {wandb: {...}}``."""

    project: str | None = None
    """W&B project; default the study name."""
    entity: str | None = None
    """W&B entity (user or team); default the API key's default entity."""
    mode: str = "auto"
    """``auto``: ``$WANDB_MODE`` if set, else online with an API key, offline without; or ``online`` / ``offline``."""
    dir: str | None = None
    """Where W&B writes its run folders (``<dir>/wandb/…``); default the study folder."""
    log_every_steps: int = 1
    """Log the per-step train loss and lr every N optimizer steps."""
    log_artifacts: bool = True
    """Upload ``config.yaml``, ``metrics.json``, ``history.csv`` (an artifact) and the confusion matrix image."""
    log_model: str = "none"
    """``onnx`` or ``safetensors``: after a run that finished, export its model (parity-checked) and log it as a ``model`` artifact."""


def _host() -> str:
    return urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).hostname or "api.wandb.ai"


def api_key_configured() -> bool:
    """An API key in ``$WANDB_API_KEY`` or a netrc entry (``$NETRC``, else ``~/.netrc``) for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(_host())
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def wandb_mode(options: WandbOptions) -> str:
    """The mode a run takes: the option, else ``$WANDB_MODE``, else ``online`` with an API key and ``offline`` without."""
    if options.mode != "auto":
        return options.mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env in ("dryrun",):
        return "offline"
    return "online" if api_key_configured() else "offline"


def new_run_id() -> str:
    """A W&B run id (8 lowercase letters and digits, as W&B makes them), chosen here so ``tracking.json`` has it from the start."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _check_reachable() -> None:
    """An online W&B that does not answer is noticed in seconds, not after ``wandb.init``'s retries."""
    u = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname or "api.wandb.ai", port), timeout=REACH_TIMEOUT_S):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot reach W&B at {u.scheme}://{u.netloc} ({type(e).__name__}: {e})") from None


@TRACKERS.register("wandb")
class WandbTracker(Tracker):
    """Weights & Biases: config, tags, per-step and per-epoch metrics, test summary, confusion image, artifacts; offline without a key."""

    name = "wandb"
    extra = "wandb"
    Options = WandbOptions
    wants_steps = True

    def __init__(self, run: RunInfo, options: WandbOptions) -> None:
        super().__init__(run, options)
        self.wb: Any = None
        self.mode = ""
        self.run_id = ""
        self.logged_epochs: set[int] = set()

    @classmethod
    def modules(cls, options: WandbOptions) -> tuple[str, ...]:
        return ("wandb",)

    @classmethod
    def check(cls, options: WandbOptions) -> str | None:
        if options.mode not in WANDB_MODES:
            return f"mode={options.mode!r} must be one of {', '.join(map(repr, WANDB_MODES))}"
        if options.log_every_steps < 1:
            return f"log_every_steps={options.log_every_steps!r} must be >= 1"
        if options.log_model not in ("none", "onnx", "safetensors"):
            return f"log_model={options.log_model!r} must be one of 'none', 'onnx', 'safetensors'"
        if options.log_model != "none":
            fmt = EXPORT_FORMATS.get(options.log_model)
            if missing := missing_modules(fmt.requires):
                return f"log_model={options.log_model} needs {', '.join(missing)}, which is not installed: pip install 'transferlab[{fmt.extra}]'"
        return None

    @property
    def root(self) -> Path:
        return Path(self.options.dir).expanduser() if self.options.dir else self.run.study_dir

    def start(self, resuming: bool, previous: dict[str, Any] | None) -> None:
        import wandb  # lazy: the optional extra

        self.mode = wandb_mode(self.options)
        if self.mode == "online":
            _check_reachable()
        cfg = self.run.cfg
        same = bool(resuming and previous and previous.get("run_id") and previous.get("project") == self._project())
        self.run_id = previous["run_id"] if same and previous else new_run_id()
        self.root.mkdir(parents=True, exist_ok=True)
        strategy = strategy_label(cfg)
        self.wb = wandb.init(
            project=self._project(), entity=self.options.entity, name=self.run.name, group=self.run.study, job_type=cfg.kind,
            id=self.run_id, resume="allow" if same else None, dir=str(self.root), mode=self.mode, reinit="create_new",
            config=flat_config(cfg), tags=[cfg.kind, strategy, cfg.model.backbone, str(cfg.model.weights)][:64],
            notes=f"transferlab run {self.run.run_dir.resolve()}",
            settings=wandb.Settings(silent=True, console="off", init_timeout=INIT_TIMEOUT_S, save_code=False),
        )
        self.wb.define_metric(STEP_KEY)
        self.wb.define_metric("*", step_metric=STEP_KEY)  # a resumed run logs its steps again: no monotonic-step refusals
        version = self.run.version()
        self.wb.config.update({"transferlab.git_commit": version.get("git_commit", "unknown"),
                               "transferlab.run_dir": str(self.run.run_dir.resolve())}, allow_val_change=True)
        if self.mode == "offline":
            why = "no API key configured" if self.options.mode == "auto" and not os.environ.get("WANDB_MODE") else "mode offline"
            self.run.console.print(
                f"tracking: wandb runs offline ({why}) for {escape(self.run.name)}: "
                f"{escape(str(self.wb.dir and Path(self.wb.dir).parent))}; upload it with `wandb sync <that folder>`",
                highlight=False,
            )

    def _project(self) -> str:
        return self.options.project or self.run.study

    def record(self) -> dict[str, Any]:
        folder = str(Path(self.wb.dir).parent) if self.wb is not None and self.wb.dir else ""
        return {"run_id": self.run_id, "project": self._project(), "entity": self.options.entity, "mode": self.mode, "folder": folder}

    def resolved(self) -> None:
        self.wb.config.update(flat_config(self.run.cfg), allow_val_change=True)  # train.lr: find -> the number

    def fit_start(self, first_step: int, steps_per_epoch: int, history: list[dict[str, float]]) -> None:
        for row in history:  # a resumed run: the epochs it did before (a no-op for those this W&B run has)
            self.log_epoch(row, int(row["epoch"]) * steps_per_epoch)

    def log_steps(self, steps: list[tuple[int, float, float]]) -> None:
        every = self.options.log_every_steps
        for step, loss, lr in steps:
            if step % every == 0:
                self.wb.log({"train/loss_step": loss, "train/lr": lr, STEP_KEY: step})

    def log_epoch(self, row: dict[str, float], step: int) -> None:
        epoch = int(row["epoch"])
        if epoch in self.logged_epochs:
            return
        values = {tag: float(row[k]) for k, tag in EPOCH_METRICS.items() if row.get(k) is not None}
        self.wb.log({**values, STEP_KEY: step})
        self.logged_epochs.add(epoch)

    def finish(self, metrics: dict[str, Any] | None, error: BaseException | None) -> None:
        import wandb

        if self.wb is None:
            return
        ok = metrics is not None and metrics.get("status") == "ok"
        if metrics is not None:
            for k in TEST_METRICS:
                v = metrics.get(k)
                if ok and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.wb.summary[k.replace("test_", "test/", 1) if k.startswith("test_") else k] = v
            self.wb.summary["status"] = str(metrics.get("status"))
            if metrics.get("error"):
                self.wb.summary["error"] = str(metrics["error"])[:2000]
        if self.options.log_artifacts:
            if ok and metrics.get("confusion_matrix"):
                image = confusion_image(metrics["confusion_matrix"], metrics.get("class_names") or [])
                self.wb.log({"test/confusion_matrix": wandb.Image(image)})
            files = [self.run.run_dir / n for n in ARTIFACTS if (self.run.run_dir / n).is_file()]
            if files:
                artifact = wandb.Artifact(f"{self._safe(self.run.name)}-files", type="run-files")
                for path in files:
                    artifact.add_file(str(path))
                self.wb.log_artifact(artifact)
        if ok and self.options.log_model != "none":
            self._log_model(metrics)
        # an interrupted run (Ctrl-C, a stopped trial) and a failed one end with a non-zero exit code: "failed" / "crashed" in W&B
        self.wb.finish(exit_code=0 if ok else 1)
        self.wb = None

    def _log_model(self, metrics: dict[str, Any]) -> None:
        """Export the run's model as ``log_model`` and log it with its parity report; a problem is said, not raised."""
        import wandb

        fmt, cfg, say = EXPORT_FORMATS.get(self.options.log_model), self.run.cfg, self.run.console.print
        if not cfg.uses.model or not checkpoint_path(self.run.run_dir).is_file():
            say(f"[yellow]tracking: wandb logs no model for {escape(self.run.name)} (a {escape(cfg.kind)} run keeps no single model)[/]")
            return
        out = self.run.run_dir / "export" / fmt.filename
        try:
            files, verdict = [*export_checkpoint(self.run.run_dir, cfg, metrics, fmt, out).files, parity_path(out)], "ok"
        except ExportParityError:
            files, verdict = [out, parity_path(out)], "failed"
        except Exception as e:  # noqa: BLE001 - the run is done; a model that does not export must not hide it
            say(f"[yellow]tracking: wandb could not log the model of {escape(self.run.name)} ({escape(type(e).__name__)}: "
                f"{escape(str(e).splitlines()[0][:300] if str(e) else '')})[/]")
            return
        artifact = wandb.Artifact(f"{self._safe(self.run.name)}-model", type="model", metadata={"format": fmt.name, "parity": verdict})
        for path in files:
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name)
            elif path.is_file():
                artifact.add_file(str(path))
        self.wb.log_artifact(artifact)
        self.wb.summary["model_parity"] = verdict

    @staticmethod
    def _safe(name: str) -> str:
        """An artifact name W&B accepts (letters, digits, ``-_.``)."""
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:120]

    def close(self) -> None:
        if self.wb is not None:  # an error path: end the W&B run without waiting on it
            try:
                self.wb.finish(exit_code=1)
            finally:
                self.wb = None
