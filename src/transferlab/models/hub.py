"""The Hugging Face Hub folder format, read side: ``weights: hf:<repo or folder>``, and whether the hub answers.

A hub folder (timm's layout) holds ``config.json`` — ``architecture``, ``num_classes``, ``label_names``
and ``pretrained_cfg`` (input size, mean, std, classifier name) — beside ``model.safetensors``. Two
kinds are read, told apart by the ``transferlab`` section transferlab's export writes into
``config.json``:

* **timm layout** — any timm hub repo (``timm/resnet18.a1_in1k``), or a transferlab export of a
  model timm can express (a timm backbone with a linear head): the tensors are a plain timm model's,
  and its classifier (``pretrained_cfg.classifier``) is dropped and reported, as for ``file:``;
* **transferlab layout** — an export of a model timm cannot express (a truncated backbone, an
  ``mlp`` / ``conv`` head, the built-in CNNs): the tensors are named as in a checkpoint
  (``backbone.*``, ``head.*``) and the ``transferlab`` section names backbone, truncation and head.

A repo id goes through ``huggingface_hub``'s cache (so ``HF_HOME`` / ``HF_HUB_CACHE`` and
``HF_HUB_OFFLINE`` apply); what is not cached is downloaded only when the hub answers within
seconds, because huggingface_hub itself retries for about a minute before it gives up.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from huggingface_hub import constants as hub_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.utils import EntryNotFoundError
from timm.models import split_model_name_tag

from transferlab.files import read_json
from transferlab.models.weights import WeightsError, read_state_file

__all__ = [
    "HF_CONFIG",
    "HF_FORMAT",
    "HF_WEIGHTS",
    "HubWeights",
    "architecture_name",
    "hf_weights_file",
    "hub_unreachable",
    "is_repo_id",
    "read_hf_backbone",
    "read_hf_config",
    "resolve_hf",
]

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_LEGACY_WEIGHTS = "pytorch_model.bin"  # older timm repos; read with torch.load(weights_only=True)
HF_FORMAT = "transferlab-hf-v1"
"""``config.json`` → ``transferlab.format`` of the folders transferlab writes."""

LOCAL_ALTERNATIVE = (
    "export the run to a folder instead (`transferlab export <run> --format hf --out DIR`) and use "
    "`weights: hf:DIR`, or copy the repo's config.json and model.safetensors into a local folder"
)

# owner/name[@revision]: what the hub accepts as a repo id (a relative path that does not exist looks the same,
# which is why a missing local folder is named in every hub error)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def architecture_name(model_name: str) -> str:
    """``resnet18.a1_in1k`` -> ``resnet18``: timm's architecture, without the pretrained tag."""
    return split_model_name_tag(model_name)[0]


def is_repo_id(text: str) -> bool:
    """``owner/name`` or ``owner/name@revision``."""
    return bool(_REPO_ID.match(text))


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode, DNS, connect), or None if it can.

    huggingface_hub retries a failing download for about a minute; this check fails in seconds.
    """
    if hub_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the files are not in the local cache"
    url = urlparse(hub_constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"the hub ({host}) is not reachable: {e}"
    return None


# --------------------------------------------------------------------------------------------
# where the folder is: a local folder, or a hub repo through its cache


def _cached(repo: str, filename: str, revision: str | None) -> Path | None:
    found = try_to_load_from_cache(repo, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def resolve_hf(argument: str) -> tuple[Path, str]:
    """The local folder holding ``config.json`` for ``hf:<argument>``, and a description for logs and errors.

    A folder that exists is used as it is; ``owner/name[@revision]`` is taken from the Hugging Face
    cache, else downloaded when the hub is reachable — offline, this fails in seconds naming the
    local-folder alternative.
    """
    where = f"weights hf:{argument}"
    if not argument:
        raise WeightsError(f"{where}: name a folder (hf:path/to/folder) or a hub repo (hf:owner/name)")
    path = Path(argument).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WeightsError(f"{where}: {path} is a file; expected a folder with {HF_CONFIG} and {HF_WEIGHTS}")
        return path, f"folder {path}"
    if not is_repo_id(argument):
        raise WeightsError(f"{where}: no such folder, and not a hub repo id (owner/name[@revision])")
    repo, _, revision = argument.partition("@")
    revision = revision or None
    config = _cached(repo, HF_CONFIG, revision)
    weights = _cached(repo, HF_WEIGHTS, revision) or _cached(repo, HF_LEGACY_WEIGHTS, revision)
    if config is not None and weights is not None and config.parent == weights.parent:
        return config.parent, f"hub repo {argument} (cached in {config.parent})"
    if why := hub_unreachable():
        raise WeightsError(f"{where}: no folder {argument!r} here, and as a hub repo it cannot be fetched: {why}; {LOCAL_ALTERNATIVE}")
    try:
        config = Path(hf_hub_download(repo, HF_CONFIG, revision=revision))
        try:
            hf_hub_download(repo, HF_WEIGHTS, revision=revision)
        except EntryNotFoundError:  # an older repo with only pytorch_model.bin
            hf_hub_download(repo, HF_LEGACY_WEIGHTS, revision=revision)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types (not found, gated, network)
        raise WeightsError(f"{where}: could not download from the hub ({type(e).__name__}: {str(e)[:200]}); {LOCAL_ALTERNATIVE}") from None
    return config.parent, f"hub repo {argument}"


# --------------------------------------------------------------------------------------------
# what the folder holds


def read_hf_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a hub folder, checked to have an ``architecture`` (errors name the file)."""
    path = folder / HF_CONFIG
    if not path.is_file():
        raise WeightsError(f"{folder}: no {HF_CONFIG} (not a Hugging Face / timm model folder)")
    try:
        cfg = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise WeightsError(f"{path}: no 'architecture' (not a timm model config)")
    return cfg


@dataclass
class HubWeights:
    """A hub folder's tensors, ready for a strict load into a backbone."""

    source: str
    backbone: dict[str, Any]
    """Backbone tensors (timm layout: the whole state dict, classifier included — see ``drop_prefixes``)."""
    drop_prefixes: list[str] = field(default_factory=list)
    """timm layout: the source classifier's key prefixes, dropped and reported by the load."""
    head: list[str] = field(default_factory=list)
    """transferlab layout: the keys of the exported head (not loaded into a backbone)."""
    truncate: dict[str, Any] | None = None
    """transferlab layout: the exported backbone's ``model.truncate``."""
    config: dict[str, Any] = field(default_factory=dict)


def hf_weights_file(folder: Path) -> Path:
    """The weights file of a hub folder: ``model.safetensors``, else an older repo's ``pytorch_model.bin``."""
    for name in (HF_WEIGHTS, HF_LEGACY_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder}: no {HF_WEIGHTS} (nor {HF_LEGACY_WEIGHTS})")


def read_hf_backbone(argument: str, expected_backbone: str | None = None) -> HubWeights:
    """Read the folder or repo ``hf:<argument>`` names, for a backbone of architecture ``expected_backbone``.

    A folder of another architecture is an error saying expected vs found, before any tensor is read.
    """
    folder, described = resolve_hf(argument)
    cfg = read_hf_config(folder)
    ours = cfg.get("transferlab") if isinstance(cfg.get("transferlab"), dict) else {}
    layout = ours.get("layout", "timm")
    found = str(ours.get("backbone") or cfg["architecture"]) if layout == "transferlab" else cfg["architecture"]
    if expected_backbone is not None and architecture_name(found) != architecture_name(expected_backbone):
        raise WeightsError(
            f"weights hf:{argument}: expected backbone {architecture_name(expected_backbone)} (model.backbone of this "
            f"experiment), found {found} ({folder / HF_CONFIG})"
        )
    path = hf_weights_file(folder)
    state = read_state_file(path)
    source = f"{described} ({path.name})"
    if layout != "transferlab":
        names = (cfg.get("pretrained_cfg") or {}).get("classifier", "fc")
        names = [names] if isinstance(names, str) else list(names)
        return HubWeights(source, state, drop_prefixes=[f"{n}." for n in names], config=cfg)
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    head = sorted(k for k in state if k.startswith("head."))
    other = sorted(set(state) - {f"backbone.{k}" for k in backbone} - set(head))
    if other:
        raise WeightsError(f"{path}: tensors outside backbone./head. in a transferlab-layout folder: {', '.join(other[:10])}")
    return HubWeights(source, backbone, head=head, truncate=ours.get("truncate"), config=cfg)
