"""Every file transferlab writes goes through here: one atomic write, JSON / CSV / text, and the
safetensors checkpoint format.

``atomic_write`` writes a temp file beside the target, fsyncs it, renames it over the target and
fsyncs the folder: a crash (SIGKILL, power loss) at any moment leaves the old file or the new one,
never a torn one; a full disk is an error that names the file and leaves the old file in place.

Checkpoints are one ``.safetensors`` file each: model tensors under ``model.``, optimizer tensors
under ``optim.``, RNG states under ``rng.``, further named groups (a second set of weights: the EMA or
the raw ones) under their name; everything else (config, class names, epoch, optimizer
hyper-parameters, scheduler state, code version) is JSON in the safetensors header. Nothing in them
can execute code when loaded. A ``.json`` copy of the metadata is written beside each for people.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import struct
import tempfile

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "atomic_write",
    "load_checkpoint",
    "load_checkpoint_group",
    "read_checkpoint_metadata",
    "read_json",
    "safetensors_header",
    "save_checkpoint",
    "write_bytes",
    "write_csv",
    "write_json",
    "write_text",
]

CHECKPOINT_FORMAT = "transferlab-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not fit. The message names the file."""


# --------------------------------------------------------------------------------------------
# atomic writes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory fds: the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)``, fsync, and atomically rename onto ``path`` (module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # mkstemp makes 0600; give the file the permissions a normal write would. After ``write``: some
        # writers (safetensors' save_file) replace the file at ``tmp`` with a new 0600 one.
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"{path}: no space left on the device (the previous version of the file is kept)") from None
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive OS lock (``flock``) on ``path`` (created if missing), waiting for it; a killed holder releases it.

    Without ``fcntl`` (Windows) this is a no-op: there, one process per folder is the rule.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as JSON (serialised first, so an unserialisable value leaves no file)."""
    write_text(path, json.dumps(obj, indent=indent))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Atomically write dict rows as CSV, columns in the order of the first row's keys (nothing when empty)."""
    if not rows:
        return
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------------
# safetensors checkpoints


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


def save_checkpoint(
    path: Path,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
    rng: dict[str, torch.Tensor] | None = None,
    groups: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write a checkpoint atomically. ``meta`` must be JSON-serialisable. ``groups`` are further named sets of
    tensors (e.g. ``{"ema": state}``: a second copy of the weights), read back with ``load_checkpoint_group``."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    for group, state in (groups or {}).items():
        if group in ("model", "optim", "rng"):
            raise ValueError(f"checkpoint group name {group!r} is reserved")  # programming error
        tensors.update({f"{group}.{k}": v.detach().cpu().contiguous() for k, v in state.items()})
    meta = {"format": CHECKPOINT_FORMAT, **meta}
    if optimizer_state is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_meta
    for k, v in (rng or {}).items():
        tensors[f"rng.{k}"] = v.detach().cpu().contiguous()
    header = {"transferlab": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    write_json(path.with_suffix(".json"), {k: v for k, v in meta.items() if k != "optimizer"})


def read_checkpoint_metadata(path: Path) -> dict[str, Any]:
    """Only the JSON metadata of a checkpoint (cheap: the header, not the tensors)."""
    path = Path(path)
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
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(model state, metadata, optimizer state or None, RNG tensors). Errors name the file."""
    meta = read_checkpoint_metadata(path)
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


def load_checkpoint_group(path: Path, group: str) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds under ``group`` (``save_checkpoint(groups=...)``); empty when none. Errors name the file."""
    read_checkpoint_metadata(path)
    prefix = f"{group}."
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from None


def safetensors_header(tensors: dict[str, tuple[str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """The bytes before the data of a safetensors file holding ``tensors`` (name -> (dtype code, shape, nbytes)).

    For writers that stream tensors larger than memory into a preallocated file (the feature cache):
    the safetensors library only writes tensors it holds. The layout is the library's own, so its
    reader (``safe_open``) validates and reads these files like any other.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the safetensors writer does
    return struct.pack("<Q", len(raw)) + raw
