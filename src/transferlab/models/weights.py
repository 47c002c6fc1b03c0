"""Strict loading of weights that names exactly what was dropped, and reading them from files and runs.

Loading is strict everywhere: a source's old classifier (or a source run's head) is dropped and
reported, keys past a truncation are left out and reported, and anything else that does not fit is
an error listing missing keys, unexpected keys and shape mismatches. Files are safetensors, or torch
state dicts read with ``torch.load(weights_only=True)``: nothing beyond tensors is ever unpickled.

Adapter-only checkpoints (``weights_scope: trainable``, written for strategies whose frozen parameters never
change: ``lora``, ``vpt``, ``bitfit``, ``norm_only``, ``bn_only``, ``linear_probe``) hold the trainable
parameters and every buffer; the frozen parameters are left out and recorded as a ``FrozenPart``: their keys,
the ``model.weights`` they come from (the base) and a sha256 fingerprint of their values. ``load_model_weights``
(every reader goes through it, or through ``load_checkpoint_state``) completes such a checkpoint from the model's
own frozen tensors — the model must have been built with the base — after checking the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transferlab.files import CheckpointError, load_checkpoint
from transferlab.models.truncate import summarize_keys
from transferlab.rundir import RunError, load_run

__all__ = [
    "FrozenPart",
    "LoadReport",
    "RunWeights",
    "WeightsError",
    "classifier_prefixes",
    "completed_state",
    "frozen_fingerprint",
    "load_checkpoint_state",
    "load_model_weights",
    "load_run_head",
    "load_strict",
    "read_run_weights",
    "read_state_file",
    "unpickling_reason",
]

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


def unpickling_reason(error: BaseException) -> str:
    """What a refused pickle holds, from torch's ``weights_only`` error, without torch's advice to load it unsafely."""
    for line in str(error).splitlines():
        m = re.search(r"(?:[Uu]nsupported|unsupported|Trying to load)[^\n]*?GLOBAL [\w.]+", line)
        if m:
            return m.group(0).removeprefix("WeightsUnpickler error: ").rstrip(".")
    return "objects other than tensors"


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely: safetensors, or a torch state dict with ``weights_only=True``."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a pickle of more than tensors: torch's advice to load it unsafely is not relayed
        raise WeightsError(
            f"cannot read weights file {path}: it is a pickle that holds more than tensors ({unpickling_reason(e)}); transferlab "
            "reads weights files as tensors only and never runs code from one. Where you trust the file, load it there and "
            "save its state dict (tensors only) with torch.save, or as .safetensors"
        ) from None
    except Exception as e:  # noqa: BLE001 - corrupt or hostile file: name it, never execute it
        raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return obj


# --------------------------------------------------------------------------------------------
# checkpoints: full, or adapter-only (the frozen parameters left out and fingerprinted)


def frozen_fingerprint(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> str:
    """sha256 over the tensors ``keys`` of ``state``, in sorted order: each one's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in sorted(keys):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype (bf16 has no numpy type)
    return h.hexdigest()


@dataclass(frozen=True)
class FrozenPart:
    """The frozen parameters an adapter-only checkpoint leaves out: their state-dict keys, the ``model.weights`` they
    come from (``base``: ``embedded``, ``imagenet``, ``file:…``, ``run:…``, ``hf:…``) and ``frozen_fingerprint`` of them."""

    keys: tuple[str, ...]
    base: str
    fingerprint: str

    @classmethod
    def of(cls, model: nn.Module, base: str) -> FrozenPart:
        """The parameters of ``model`` that do not train now (``requires_grad`` off), fingerprinted."""
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        state = model.state_dict()
        keys = tuple(sorted(k for k in state if k in frozen))
        return cls(keys, base, frozen_fingerprint(state, keys))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], path: Path | str) -> FrozenPart | None:
        """The record in a checkpoint's metadata; ``None`` for a full checkpoint (every one written before scopes)."""
        scope = meta.get("weights_scope", "full")
        if scope == "full":
            return None
        frozen = meta.get("frozen")
        if scope != "trainable" or not isinstance(frozen, dict) or not {"keys", "base", "fingerprint"} <= set(frozen):
            raise CheckpointError(f"{path}: weights_scope {scope!r} without a readable record of its frozen weights "
                                  "(expected weights_scope 'full', or 'trainable' with frozen: keys, base, fingerprint)")
        return cls(tuple(frozen["keys"]), str(frozen["base"]), str(frozen["fingerprint"]))

    def meta(self) -> dict[str, Any]:
        """What a checkpoint's metadata records (``from_meta`` reads it back)."""
        return {"weights_scope": "trainable",
                "frozen": {"base": self.base, "fingerprint": self.fingerprint, "count": len(self.keys), "keys": list(self.keys)}}

    def strip(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` without the frozen tensors: what an adapter-only checkpoint stores."""
        left_out = set(self.keys)
        return {k: v for k, v in state.items() if k not in left_out}


def completed_state(model: nn.Module, state: dict[str, torch.Tensor], part: FrozenPart, path: Path | str) -> dict[str, torch.Tensor]:
    """An adapter-only checkpoint's ``state`` completed with ``model``'s own frozen tensors, after checking that they are
    the ones the run trained on (``part.fingerprint``); the strict load that follows checks every other key."""
    current = model.state_dict()
    absent = [k for k in part.keys if k not in current]
    if absent:
        raise CheckpointError(f"{path} leaves out {len(part.keys)} frozen tensors of model.weights={part.base}, and this model lacks "
                              f"{len(absent)} of them ({', '.join(absent[:5])}{' …' if len(absent) > 5 else ''}): "
                              "it is not the architecture the run trained")
    found = frozen_fingerprint(current, part.keys)
    if found != part.fingerprint:
        raise CheckpointError(
            f"{path} holds only the tensors its run trained; its {len(part.keys)} frozen tensors must be those of "
            f"model.weights={part.base} as the run loaded them (fingerprint {part.fingerprint[:16]}…), but the model built now has "
            f"{found[:16]}…: the base changed since the run (another file, package version or source run), so the checkpoint "
            "cannot be completed. Restore that base, or rerun the experiment"
        )
    return {**state, **{k: current[k] for k in part.keys}}


def load_checkpoint_state(model: nn.Module, state: dict[str, torch.Tensor], meta: Mapping[str, Any], path: Path | str) -> None:
    """Load the model tensors ``state`` of checkpoint ``path`` (metadata ``meta``) into ``model`` strictly.

    A full checkpoint loads as it is. An adapter-only one (``weights_scope: trainable``) needs ``model`` built with its
    base weights: the frozen tensors' fingerprint is checked, every stored key must exist and the keys it lacks must be
    exactly the recorded frozen ones. Errors (``CheckpointError``) name the file, the base and the fingerprints.
    """
    part = FrozenPart.from_meta(meta, path)
    if part is not None:
        stored_frozen = sorted(set(part.keys) & set(state))
        if stored_frozen:
            raise CheckpointError(f"{path}: records {', '.join(stored_frozen[:5])} as left out, yet holds them (a damaged checkpoint)")
        state = completed_state(model, state, part, path)
    try:
        load_strict(model, state, str(path), drop_prefixes=[])
    except WeightsError as e:
        raise CheckpointError(str(e)) from None


def load_model_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load a checkpoint's model tensors into ``model`` strictly (``load_checkpoint_state``: an adapter-only checkpoint
    needs ``model`` built with its base weights); returns its metadata. Errors name the file."""
    state, meta, _, _ = load_checkpoint(path)
    load_checkpoint_state(model, state, meta, path)
    return meta


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
    try:
        completed = FrozenPart.from_meta(meta, path) is not None
        if completed:  # adapter-only: the run's own model rebuilt on its base (LoRA merged), the same loader as load_run
            state = {k: v.detach() for k, v in load_run(run_dir).load_model(name).state_dict().items()}
    except (CheckpointError, RunError) as e:
        raise WeightsError(f"weights run:{run_dir}: {e}") from None
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    other = sorted(set(state) - {f"backbone.{k}" for k in backbone} - set(head))
    if other:
        raise WeightsError(f"weights run:{run_dir}: {path} has tensors outside backbone./head.: {', '.join(other[:10])}")
    epoch = meta.get("epoch")
    return RunWeights(
        source=f"run {run_dir} ({path.name}, epoch {epoch + 1 if isinstance(epoch, int) else '?'}"
               + (f"; adapter-only, completed with its base {meta['frozen']['base']})" if completed else ")"),
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
