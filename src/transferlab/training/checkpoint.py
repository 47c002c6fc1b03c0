"""Checkpoints as safetensors with JSON metadata: nothing in them can execute code when loaded.

One checkpoint is one ``.safetensors`` file: model tensors under ``model.``, optimizer tensors
under ``optim.``, RNG states under ``rng.``; everything else (config, class names, metrics, epoch,
optimizer hyper-parameters, scheduler state, code version) is JSON stored in the safetensors
header, so the file is self-describing and written atomically in one piece (temp file, fsync,
``os.replace``). A ``.json`` copy of the metadata is written beside it for people to read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from transferlab.models.weights import WeightsError

FORMAT = "transferlab-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not fit. The message names the file."""


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in state["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, _, idx, k = key.split(".", 3)
        state.setdefault(int(idx), {})[k] = v
    for idx, kv in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(kv)
    return {"state": state, "param_groups": meta["param_groups"]}


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then fsync and atomically rename onto ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions a normal write would
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(
    path: Path,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint atomically. ``meta`` must be JSON-serialisable."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    meta = {"format": FORMAT, **meta}
    if optimizer_state is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_meta
    for k, v in (rng or {}).items():
        tensors[f"rng.{k}"] = v.detach().cpu().contiguous()
    header = {"transferlab": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    sidecar = {k: v for k, v in meta.items() if k != "optimizer"}
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(sidecar, indent=2)))


def read_metadata(path: Path) -> dict[str, Any]:
    """Read only the JSON metadata of a checkpoint (cheap: the header, not the tensors)."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if "transferlab" not in header:
        raise CheckpointError(f"{path}: safetensors file without transferlab metadata (not a transferlab checkpoint)")
    meta = json.loads(header["transferlab"])
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None, dict[str, torch.Tensor]]:
    """Return (model_state, meta, optimizer_state or None, rng tensors). Errors name the file."""
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from None
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    optim = None
    if "optimizer" in meta:
        optim = _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"])
    return model_state, meta, optim, rng


def load_model_weights(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Load a checkpoint's model tensors into ``model`` strictly; returns the metadata."""
    from transferlab.models.weights import load_strict

    state, meta, _, _ = load_checkpoint(path)
    try:
        load_strict(model, state, str(path), drop_prefixes=[])
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    return meta
