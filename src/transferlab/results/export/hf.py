"""A run's model in the Hugging Face Hub format: the folder (``export --format hf``), its model card, ``push``.

The folder is timm's hub layout — ``config.json``, ``model.safetensors``, ``README.md`` — so the
hub shows it like any timm model and ``timm.create_model("local-dir:DIR", pretrained=True)`` builds
it. Whether plain timm can build it depends on the model:

* **timm layout** — a timm backbone, not truncated, with a ``linear`` head *is* a timm model with
  ``num_classes`` classes: the head's linear layer becomes the model's own classifier (its
  ``pretrained_cfg.classifier``, e.g. ``fc``), the head's dropout is an identity at inference, and
  the tensors are saved under timm's names. Plain timm loads it (no transferlab needed).
* **transferlab layout** — a truncated backbone, an ``mlp`` or ``conv`` head, or the built-in CNNs
  are no timm architecture. The folder is still written, with the tensors named as in a
  checkpoint and a ``transferlab`` section in ``config.json`` (backbone, truncation, head);
  ``architecture`` is ``transferlab:<backbone>`` so plain timm refuses it with "Unknown model"
  instead of building something else. transferlab reads it: ``weights: hf:DIR`` (the backbone) and
  ``load_hf_model(DIR)`` (the whole model). A built-in CNN (not truncated) also gets
  ``modeling_transferlab_cnn.py`` (``standalone_cnn``: plain torch), so people without transferlab load it too.

The preprocessing travels in ``pretrained_cfg`` in timm's words — ``crop_pct``, ``crop_mode``
(``center`` for ``resize: crop``, ``squash`` for ``stretch``, ``border`` for ``pad``) and
``interpolation`` — so ``timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=…))``
preprocesses as the run did. ``center`` and ``squash`` reproduce transferlab's resize exactly; timm's
``border`` pads with the mean colour where transferlab padded black, which the card says, with the
exact transform. ``transferlab.spec`` holds the whole ``ExportSpec``.

``hf`` is one more ``ExportFormat`` in ``transferlab.results.export.EXPORT_FORMATS`` (registered
when this module is imported; ``import transferlab`` does), so it gets the same parity check as every
format: the folder is read back the way its users read it (timm's ``local-dir:`` loader, or
``load_hf_model``) and run beside the run's model on its recorded test samples; the report is
written beside the folder (``<folder>.parity.json``) and a failed check is an error.

The format lives in the results layer with the other formats; its model card also reads the run and the
study around it: the test accuracy of every seed (mean ± std) and the comparison table's row.

A multi-label run's folder says so where Hugging Face tools look: ``config.json`` has ``problem_type:
"multi_label_classification"`` (a multiclass one ``single_label_classification``, as transformers writes) and
``thresholds`` (one per label, chosen on validation); the card calls it a multi-label classifier, reports the test
mAP instead of accuracy, lists each label's threshold and AP, and its code applies a sigmoid and the thresholds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from huggingface_hub import HfApi
from safetensors.torch import save_file
from torch import nn

from transferlab.config import ConfigError, HeadConfig, ModelConfig, StrategyConfig, from_dict
from transferlab.files import atomic_write, read_json, write_json, write_text
from transferlab.models import TransferModel, build_model, load_strict, read_state_file
from transferlab.models.adapters import add_strategy_modules
from transferlab.models.hub import (
    HF_CONFIG,
    HF_FORMAT,
    HF_WEIGHTS,
    architecture_name,
    hf_weights_file,
    hub_unreachable,
    is_repo_id,
    read_hf_config,
    resolve_hf,
)
from transferlab.models.small_cnn import SmallCNN
from transferlab.results.compare import experiment_row, headline
from transferlab.results.export import standalone_cnn
from transferlab.results.export.parity import parity_path
from transferlab.results.export.run import ExportResult
from transferlab.results.export.spec import EXPORT_FORMATS, ExportError, ExportFormat, ExportSpec
from transferlab.results.report.markdown import md_esc
from transferlab.rundir import Run, RunError, load_run, read_study
from transferlab.rundir.metrics import HEADLINE

__all__ = [
    "HF_CARD",
    "PARITY_FILE",
    "STANDALONE_FILE",
    "TIMM_CROP_MODES",
    "HubError",
    "HubModel",
    "export_hf",
    "load_hf_model",
    "model_card",
    "push_hf",
    "timm_equivalent",
    "timm_preprocessing",
]

HF_CARD = "README.md"
PARITY_FILE = "transferlab_parity.json"
"""The export's parity report, inside the folder ``push`` uploads (beside the folder for ``export``)."""
STANDALONE_FILE = "modeling_transferlab_cnn.py"
"""The plain-torch module file (a copy of ``standalone_cnn``) in the folder of a built-in CNN."""
TIMM_CROP_MODES = {"crop": "center", "stretch": "squash", "pad": "border"}
"""``data.resize`` in timm's ``crop_mode`` words (``timm.data.transforms_factory.transforms_imagenet_eval``)."""
PROBLEM_TYPES = {"multiclass": "single_label_classification", "multilabel": "multi_label_classification"}
"""``config.json``'s ``problem_type`` per task, in the words of Hugging Face transformers' ``PretrainedConfig``."""


def timm_preprocessing(spec: ExportSpec) -> tuple[dict[str, Any], str | None]:
    """(``crop_pct``, ``crop_mode``, ``interpolation`` for ``pretrained_cfg``, what timm's transform gets wrong or ``None``).

    ``center`` (torchvision ``Resize(floor(S / crop_pct))`` + ``CenterCrop(S)``) and ``squash`` (``Resize((S, S))`` at
    crop_pct 1) compute the sizes and offsets transferlab's resize computes, with PIL's bilinear filter; ``border``
    (``ResizeKeepRatio(longest=1)`` + ``CenterCropOrPad``) places the image as ``pad`` does but fills with the mean colour.
    """
    mode = TIMM_CROP_MODES[spec.resize]
    crop_pct = float(spec.crop_pct) if spec.resize == "crop" else 1.0
    out = {"crop_pct": crop_pct, "crop_mode": mode, "interpolation": spec.interpolation}
    if spec.resize == "pad":
        fill = [round(255 * m) for m in spec.mean]
        s = spec.image_size
        return out, (f"timm's `border` mode pads with the mean colour {fill}, where the run padded with black (0); "
                     f"`ResizeKeepRatio({s}, longest=1.0)` + `CenterCropOrPad({s}, fill=0)` (timm.data.transforms) instead of "
                     "`create_transform` give the run's input exactly")
    return out, None


def _standalone_args(model: nn.Module, model_cfg: ModelConfig, head: dict[str, Any]) -> dict[str, Any] | None:
    """``standalone_cnn.TransferlabCNN``'s arguments for ``model``, or ``None`` when it is not a plain built-in CNN."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, SmallCNN) or model_cfg.truncate is not None or head.get("type") not in ("linear", "mlp", "conv"):
        return None
    blocks = list(backbone.blocks)
    convs = [m for m in blocks[0].modules() if isinstance(m, nn.Conv2d)]
    return {
        "backbone": {
            "in_chans": convs[0].in_channels,
            "widths": [next(m for m in b.modules() if isinstance(m, nn.Conv2d)).out_channels for b in blocks],
            "convs_per_block": len(convs),
            "style": "pool_first" if isinstance(blocks[0][1], nn.MaxPool2d) else "vgg",
            "act": "gelu" if any(isinstance(m, nn.GELU) for m in backbone.modules()) else "relu",
            "global_pool": "max" if isinstance(backbone.global_pool, nn.AdaptiveMaxPool2d) else "avg",
        },
        "head": {k: head.get(k) for k in ("type", "hidden", "conv_channels", "kernel_size")},
    }


class HubError(RuntimeError):
    """An export or push that cannot be done. The message names the run, folder or repo and what to do."""


# --------------------------------------------------------------------------------------------
# which models timm can express


def timm_equivalent(model: TransferModel, model_cfg: ModelConfig) -> tuple[nn.Module | None, str | None]:
    """The same network as a plain timm model with ``num_classes`` classes, or ``(None, why not)``.

    Built with ``pretrained=False`` (no download) and loaded strictly: every backbone tensor under its
    own name, the head's linear layer as timm's classifier. A key set that does not fit is a "why not".
    """
    arch = str(model.pretrained_cfg.get("architecture") or architecture_name(model_cfg.backbone))
    classifier = model.pretrained_cfg.get("classifier")
    if model_cfg.truncate is not None:
        return None, f"the backbone is truncated ({_truncate_text(model_cfg)}), which no timm architecture expresses"
    if type(model.backbone).__module__.startswith("transferlab."):
        return None, f"{arch} is transferlab's own architecture (registered with timm only inside transferlab)"
    if model.head_cfg.type != "linear":
        return None, f"the head is a {model.head_cfg.type!r} head; timm models end in a single linear classifier"
    if not isinstance(classifier, str):
        return None, f"{arch} has no single classifier layer to put the head in (pretrained_cfg.classifier = {classifier!r})"
    linear = model.head[-1]
    state = {**model.backbone.state_dict(), f"{classifier}.weight": linear.weight, f"{classifier}.bias": linear.bias}
    plain = timm.create_model(arch, pretrained=False, num_classes=model.num_classes)
    try:
        load_strict(plain, state, f"the {arch} backbone with its linear head", drop_prefixes=[])
    except Exception as e:  # noqa: BLE001 - the key sets differ: timm's classifier is more than one linear layer
        return None, f"timm's {arch} with num_classes={model.num_classes} does not have the same tensors ({str(e)[:300]})"
    return plain.eval(), None


def _truncate_text(model_cfg: ModelConfig) -> str:
    t = model_cfg.truncate
    return "" if t is None else (f"stages: {t.stages}" if t.stages is not None else f"after: {t.after}")


# --------------------------------------------------------------------------------------------
# reading a folder back as a whole model


@dataclass
class HubModel:
    """A hub folder read back as a ``TransferModel`` (eval mode), with what its ``config.json`` says."""

    model: TransferModel
    class_names: list[str]
    image_size: int
    """Side of the square images the model was trained on (``pretrained_cfg.input_size``)."""
    config: dict[str, Any]
    path: Path


def load_hf_model(source: str | Path) -> HubModel:
    """Read a hub folder or repo (either layout) as a whole ``TransferModel``: backbone *and* head.

    ``source`` is what ``weights: hf:`` takes: a folder, or ``owner/name[@revision]`` (from the cache,
    or downloaded when the hub answers). A timm hub model comes with its own classifier as a linear head.
    """
    folder, described = resolve_hf(str(source))
    cfg = read_hf_config(folder)
    ours = cfg.get("transferlab") if isinstance(cfg.get("transferlab"), dict) else {}
    pre = dict(cfg.get("pretrained_cfg") or {})
    num_classes = int(cfg.get("num_classes") or pre.get("num_classes") or 0)
    where = str(folder / HF_CONFIG)
    state = read_state_file(hf_weights_file(folder))
    if ours.get("layout") == "transferlab":
        spec = {"backbone": ours["backbone"], "weights": "scratch", "truncate": ours.get("truncate"),
                "image_size": ours.get("image_size")}  # a fixed-input-size backbone (ViT, Swin) is built at the run's size
        model_cfg = from_dict(ModelConfig, spec, f"{where}: transferlab")
        head_cfg = from_dict(HeadConfig, dict(ours.get("head") or {}), f"{where}: transferlab.head")
    else:
        model_cfg, head_cfg = ModelConfig(backbone=cfg["architecture"], weights="scratch"), HeadConfig(type="linear")
        prefix = f"{pre.get('classifier', 'fc')}."
        state = {(f"head.1.{k[len(prefix):]}" if k.startswith(prefix) else f"backbone.{k}"): v for k, v in state.items()}
    model, _ = build_model(model_cfg, head_cfg, num_classes)
    if ours.get("strategy"):  # VPT prompts: part of the model, their weights are in the folder
        add_strategy_modules(model, from_dict(StrategyConfig, dict(ours["strategy"]), f"{where}: transferlab.strategy"))
    load_strict(model, state, f"{described} ({hf_weights_file(folder).name})", drop_prefixes=[])
    # the folder's normalisation governs (it is the one the weights were trained with)
    model.backbone.pretrained_cfg = {**model.pretrained_cfg, **{k: pre[k] for k in ("input_size", "mean", "std") if k in pre}}
    names = cfg.get("label_names") or pre.get("label_names") or [str(i) for i in range(num_classes)]
    size = int((pre.get("input_size") or (3, 224, 224))[-1])
    return HubModel(model.eval(), [str(n) for n in names], size, cfg, folder)


# --------------------------------------------------------------------------------------------
# writing the folder: the ``hf`` format of ``transferlab export``


def _hf_config(
    model: TransferModel, spec: ExportSpec, layout: str, arch: str, why_not: str | None, standalone: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``config.json``: timm's fields (what ``timm.create_model('local-dir:…')`` reads) plus a ``transferlab`` section."""
    # timm's facts about the architecture only — not where, under which license or from which paper
    # the *original* weights came (these are new weights) — and this run's input, in timm's words
    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if v is not None and k in _ARCH_KEYS}
    timm_pre, timm_differs = timm_preprocessing(spec)
    pretrained_cfg.update(
        architecture=arch,
        input_size=[spec.in_chans, spec.image_size, spec.image_size],
        mean=list(spec.mean),
        std=list(spec.std),
        **timm_pre,
        num_classes=spec.num_classes,
        custom_load=False,
    )
    if layout == "transferlab":
        pretrained_cfg.pop("classifier", None)  # the head is transferlab's, not a timm classifier
    labels = {"thresholds": list(spec.thresholds)} if spec.task == "multilabel" and spec.thresholds else {}
    return {
        "architecture": arch,
        "num_classes": spec.num_classes,
        "num_features": model.num_features,
        "label_names": list(spec.class_names),
        "problem_type": PROBLEM_TYPES[spec.task],
        **labels,
        "pretrained_cfg": pretrained_cfg,
        "transferlab": {
            "format": HF_FORMAT,
            "layout": layout,
            "timm_loadable": layout == "timm",
            "why_not_timm": why_not,
            "backbone": spec.model.get("backbone"),
            "truncate": spec.model.get("truncate"),
            "head": spec.head,
            "strategy": spec.strategy or None,
            "image_size": spec.image_size,
            "channels": spec.channels,
            "resize": spec.resize,
            "crop_pct": spec.crop_pct,
            "preprocessing": spec.recipe(),
            "task": spec.task,
            "timm_transform_exact": timm_differs is None,
            "timm_transform_differs": timm_differs,
            "standalone": {"file": STANDALONE_FILE, **standalone} if standalone else None,
            "spec": json.loads(spec.to_json()),
        },
    }


_ARCH_KEYS = ("fixed_input_size", "first_conv", "classifier", "min_input_size")


def _check_out(out: Path) -> None:
    """``out`` must be new, empty, or an earlier transferlab export (whose files are replaced)."""
    if out.exists() and not out.is_dir():
        raise HubError(f"--out {out}: is a file; expected a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = read_hf_config(out).get("transferlab", {}).get("format") == HF_FORMAT
        except Exception:  # noqa: BLE001 - anything unreadable is not ours to overwrite
            earlier = False
        if not earlier:
            raise HubError(f"--out {out}: the folder exists, is not empty and is not a transferlab hf export; choose a new folder")


def _save_hf(model: nn.Module, example: torch.Tensor, spec: ExportSpec, out: Path) -> list[Path]:
    """``ExportFormat.save`` of ``hf``: config.json, model.safetensors and the model card, in folder ``out``."""
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = from_dict(ModelConfig, spec.model, "model")
    plain, why_not = timm_equivalent(model, model_cfg)
    if plain is not None:
        layout, arch, state = "timm", str(plain.pretrained_cfg.get("architecture")), plain.state_dict()
    else:
        layout, arch, state = "transferlab", f"transferlab:{model_cfg.backbone}", model.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(out / HF_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))  # "pt": what the hub expects
    standalone = _standalone_args(model, model_cfg, spec.head) if layout == "transferlab" else None
    cfg = _hf_config(model, spec, layout, arch, why_not, standalone)
    write_json(out / HF_CONFIG, cfg)
    write_text(out / HF_CARD, model_card(spec, cfg, _source_run(spec)))
    files = [out / HF_CONFIG, out / HF_WEIGHTS, out / HF_CARD]
    if standalone:
        source = Path(standalone_cnn.__file__)
        atomic_write(out / STANDALONE_FILE, lambda tmp: shutil.copyfile(source, tmp))
        files.append(out / STANDALONE_FILE)
    elif (out / STANDALONE_FILE).exists():  # an earlier export of another model into this folder
        (out / STANDALONE_FILE).unlink()
    return files


def _load_hf(folder: Path) -> nn.Module:
    """``ExportFormat.load`` of ``hf``: the folder read the way its users read it."""
    if read_hf_config(folder).get("transferlab", {}).get("layout") == "transferlab":
        return load_hf_model(folder).model
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def _read_hf_spec(folder: Path) -> ExportSpec:
    """``ExportFormat.read_spec`` of ``hf``: the ``ExportSpec`` in ``config.json`` (``transferlab.spec``)."""
    spec = (read_hf_config(folder).get("transferlab") or {}).get("spec")
    if not isinstance(spec, dict):
        raise ExportError(f"{folder / HF_CONFIG}: no transferlab export metadata (transferlab.spec); not a transferlab hf export")
    return ExportSpec.from_json(json.dumps(spec), str(folder / HF_CONFIG))


def _source_run(spec: ExportSpec) -> Run | None:
    try:
        return load_run(spec.source) if spec.source else None
    except (RunError, ConfigError, OSError, ValueError):
        return None  # the card is then written from the spec alone


EXPORT_FORMATS.register(obj=ExportFormat(
    "hf", "hf", _save_hf, _load_hf,
    "timm.create_model('local-dir:…', pretrained=True) or load_hf_model, by layout",
    "timm hub folder: config.json + model.safetensors + README.md model card",
    help="a Hugging Face Hub folder in timm's layout (config.json, model.safetensors, README.md model card)", folder=True,
    read_spec=_read_hf_spec,
))


def export_hf(run: Run | str | Path, out: str | Path, checkpoint: str = "best") -> ExportResult:
    """``transferlab export <run> --format hf --out DIR``: ``Run.export("hf", out)`` — write the folder and check it.

    The parity report is written beside the folder (``<out>.parity.json``); a failed check raises
    ``ExportParityError``. A non-empty ``out`` that is no earlier export is refused before any work.
    """
    run = load_run(run) if isinstance(run, (str, Path)) else run
    _check_out(Path(out))  # before the model is loaded (the format's save checks it again)
    return run.export("hf", out, checkpoint=checkpoint)


# --------------------------------------------------------------------------------------------
# the model card


def _study_row(run: Run) -> tuple[dict[str, Any] | None, list[tuple[Any, float]]]:
    """The comparison row of this run's experiment and (seed, test accuracy — test mAP for multi-label) of each of its
    finished seeds."""
    try:
        study = read_study(run.path.parent)
    except (RunError, FileNotFoundError, OSError, ValueError):
        return None, []
    for exp in study.experiments:
        if exp.name == str(run.record.experiment) and any(r.path.resolve() == run.path.resolve() for r in exp.runs):
            key = HEADLINE[run.record.task]
            return experiment_row(exp), [(r.seed, getattr(r.record, key)) for r in exp.ok_runs if getattr(r.record, key) is not None]
    return None, []


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.2f}%"


def _settings(obj: Any, skip: tuple[str, ...] = ()) -> str:
    """``a: 1, b.c: x`` of a config dataclass's set (non-null) fields, nested ones dotted: no Python reprs."""
    items = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    text = ", ".join(f"{k}: {v}" for k, v in _flat_items(items, "") if k.split(".")[0] not in skip)
    return "`" + text.replace("`", "'") + "`"  # code spans: user strings (class names, paths) need no escaping


def _flat_items(d: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        if v is None or v is False or v in ([], {}):
            continue
        if isinstance(v, dict):
            out += _flat_items(v, f"{prefix}{k}.")
        elif isinstance(v, (list, tuple)):
            out.append((f"{prefix}{k}", "[" + ", ".join(json.dumps(x) if isinstance(x, (dict, list)) else str(x) for x in v) + "]"))
        else:
            out.append((f"{prefix}{k}", str(v)))
    return out


# data settings the card does not show: where the files are, loader details, and test_fraction, which only
# applies to datasets without a test split of their own (the card states the real test share instead)
_DATA_UNUSED = ("dataset", "root", "num_workers", "in_memory", "synthetic_classes", "synthetic_size", "test_fraction")


def _shares(n_train: Any, n_val: Any, n_test: Any) -> str:
    counts = [n for n in (n_train, n_val, n_test) if isinstance(n, int)]
    if len(counts) != 3 or not sum(counts):
        return ""
    total = sum(counts)
    return f" ({100 * n_train / total:.0f} / {100 * n_val / total:.0f} / {100 * n_test / total:.0f} % of the {total} images used)"


def model_card(spec: ExportSpec, hf_config: dict[str, Any], run: Run | None = None) -> str:
    """The folder's ``README.md``: what the model is, its data, training, results, how to use it, its limits.

    ``run`` (the run ``spec.source`` names) adds the data, training and results sections; without it
    the card says what the spec knows.
    """
    ours = hf_config["transferlab"]
    timm_loadable = ours["layout"] == "timm"
    multi = spec.task == "multilabel"
    tags = ["image-classification", *(["multi-label-classification"] if multi else []), *(["timm"] if timm_loadable else []), "transferlab"]
    meta: dict[str, Any] = {
        "tags": tags,
        "library_name": "timm" if timm_loadable else "transferlab",
        "pipeline_tag": "image-classification",
        "metrics": ["map", "f1"] if multi else ["accuracy"],
    }
    if run is not None and (base := _base_model(run)):
        meta["base_model"] = base
    weights = f" (`weights: {run.config.model.weights}`) with the `{run.record.strategy}` strategy" if run is not None else ""
    of = f" of `{run.config.data.dataset}`" if run is not None else ""
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", f"# Model card for {md_esc(spec.experiment or 'a transferlab model')}", ""]
    what = (f"A multi-label image classifier for {spec.num_classes} labels{of} (any number of labels per image: a sigmoid per "
            "label, each with its own threshold chosen on validation)" if multi else f"An image classifier for {spec.num_classes} classes{of}")
    lines += [
        f"{what}, trained with transferlab from a `{ours['backbone']}` backbone{weights}. "
        f"Exported from run `{md_esc(Path(spec.source).name or '?')}`, checkpoint `{spec.checkpoint}`.",
        "",
    ]
    lines += _card_model(spec, hf_config, run)
    if run is not None:
        lines += _card_data_and_training(run)
        lines += _card_results(run)
    lines += _usage(spec, hf_config)
    lines += [
        "## Export check",
        "",
        "`transferlab export` read this folder back the way the code above does and ran it beside the run's model on the "
        "run's recorded test samples: top-1 had to agree and the logits to match within a stated tolerance. The figures "
        "are in the parity report written beside the folder (`<folder>.parity.json`; `transferlab push` uploads it as "
        f"`{PARITY_FILE}`).",
        "",
    ]
    lines += _card_limits(spec, hf_config, run)
    return "\n".join(lines)


def _card_model(spec: ExportSpec, hf_config: dict[str, Any], run: Run | None) -> list[str]:
    pre, ours = hf_config["pretrained_cfg"], hf_config["transferlab"]
    size, chans = spec.image_size, spec.in_chans
    gray = "; the training images were grayscale, repeated to 3 channels" if spec.channels == 1 and chans == 3 else ""
    truncate = ours.get("truncate") or {}
    truncated = f", truncated ({', '.join(f'{k}: {v}' for k, v in truncate.items() if v is not None)})" if truncate else ""
    head = HeadConfig(**spec.head) if spec.head else HeadConfig()
    lines = [
        "## Model details",
        "",
        f"- **Architecture:** `{hf_config['architecture']}` ({'a plain timm model' if ours['layout'] == 'timm' else 'transferlab layout'})",
        f"- **Backbone:** `{ours['backbone']}`{truncated}",
        f"- **Head:** {_settings(head, skip=_HEAD_UNUSED.get(head.type, ()))}",
    ]
    if run is not None:
        rec = run.record
        source = f" — {md_esc(rec.weights_source)}" if rec.weights_source else ""
        lines.append(f"- **Weights source:** `{run.config.model.weights}`{source}")
        if rec.total_params:
            lines.append(f"- **Parameters:** {rec.total_params:,} ({rec.trainable_params:,} trained)")
    how = {"crop": f"`resize: crop`, crop_pct {spec.crop_pct:g}", "pad": "`resize: pad` (letterbox on black)",
           "stretch": "`resize: stretch` (aspect not kept)"}[spec.resize]
    lines += [
        f"- **Input:** {chans}×{size}×{size}, mean {pre['mean']}, std {pre['std']}{gray}",
        f"- **Preprocessing** ({how}): {spec.recipe()}",
        f"- **{'Labels' if spec.task == 'multilabel' else 'Classes'}:** {', '.join(md_esc(c) for c in spec.class_names)}",
        "",
    ]
    if spec.task == "multilabel":
        mode = f" ({run.record.threshold_mode})" if run is not None and run.record.threshold_mode else ""
        lines[-1:-1] = [
            "- **Task:** multi-label (`problem_type: multi_label_classification`): `sigmoid(logits)` gives each label's probability; "
            f"a label is predicted when its probability is at least its threshold{mode}, chosen on the validation split "
            "(`thresholds` in `config.json`, in label order)",
            "- **Thresholds:** " + ", ".join(f"{md_esc(c)} {t:.3f}" for c, t in zip(spec.class_names, spec.thresholds or (), strict=False)),
        ]
    if spec.tta != "none":
        lines[-1:-1] = [f"- **Test-time augmentation** of the run: `{spec.tta}` (not part of the model: the results below include it)"]
    return lines


# head settings that do not apply to a head type (the card shows only what shaped the model)
_HEAD_UNUSED = {"linear": ("hidden", "conv_channels", "kernel_size"), "mlp": ("conv_channels", "kernel_size")}


def _card_data_and_training(run: Run) -> list[str]:
    cfg, rec = run.config, run.record
    best = f", best epoch {rec.best_epoch} by {rec.monitor}" if rec.best_epoch is not None else ""
    seconds = f"{rec.train_seconds:.1f} s on {rec.device}" if rec.train_seconds is not None else "—"
    return [
        "## Data",
        "",
        f"- **Dataset:** `{cfg.data.dataset}`" + (f" ({md_esc(cfg.data.root)})" if cfg.data.root else ""),
        f"- **Selection:** {_settings(cfg.data, skip=_DATA_UNUSED)}",
        f"- **Images:** {rec.n_train} train, {rec.n_val} validation, {rec.n_test} test{_shares(rec.n_train, rec.n_val, rec.n_test)} "
        f"(seed {run.seed}; indices in the run's `selection.json`)",
        "",
        "## Training",
        "",
        f"- **Strategy:** {_settings(cfg.strategy)}",
        f"- **Training config:** {_settings(cfg.train, skip=('progress', 'checkpoint_every_steps', 'checkpoint_every_minutes'))}",
        f"- **Epochs run:** {rec.epochs_run}{best}" + (" (stopped early)" if rec.stopped_early else ""),
        f"- **Training time:** {seconds}",
        "",
    ]


def _card_results(run: Run) -> list[str]:
    if run.record.task == "multilabel":
        return _card_multilabel_results(run)
    cfg, rec = run.config, run.record
    row, seeds = _study_row(run)
    extra = f", top-5 {_pct(rec.test_top5)}" if rec.test_top5 is not None else ""
    extra += f", loss {rec.test_loss:.4f}" if rec.test_loss is not None else ""
    extra += f" (test-time augmentation: {cfg.train.tta})" if cfg.train.tta != "none" else ""
    lines = ["## Results", "", f"Test accuracy of this run (seed {run.seed}): **{_pct(rec.test_acc)}**{extra}.", ""]
    lines += _over_seeds(row, seeds)
    if rec.per_class_acc:
        lines += ["| class | test accuracy |", "|---|---:|"]
        lines += [f"| {md_esc(c)} | {_pct(a)} |" for c, a in zip(run.class_names, rec.per_class_acc, strict=False)]
        lines.append("")
    return lines


def _card_multilabel_results(run: Run) -> list[str]:
    """A multi-label run's results: test mAP (and over the study's seeds, mean ± std), the scores at the thresholds, the
    experiment's comparison row, and per label its threshold and test AP."""
    rec = run.record
    row, seeds = _study_row(run)
    scores = ", ".join(f"{name} {fmt(v)}" for name, v, fmt in (
        ("micro mAP", rec.test_map_micro, _pct), ("F1 (macro)", rec.test_f1, _frac), ("exact match", rec.test_exact_match, _pct),
        ("Hamming loss", rec.test_hamming, _frac)) if v is not None)
    lines = ["## Results", "", f"Test mAP (macro, over the labels with a test positive) of this run (seed {run.seed}): "
             f"**{_pct(rec.test_map)}**; at the thresholds chosen on validation: {scores}.", ""]
    lines += _over_seeds(row, seeds)
    if rec.thresholds:
        aps = rec.per_class_ap or [None] * len(rec.thresholds)
        lines += ["| label | threshold | test AP |", "|---|---:|---:|"]
        lines += [f"| {md_esc(c)} | {t:.3f} | {_pct(a)} |" for c, t, a in zip(run.class_names, rec.thresholds, aps, strict=False)]
        lines.append("")
    return lines


def _over_seeds(row: dict[str, Any] | None, seeds: list[tuple[Any, float]]) -> list[str]:
    """The experiment's headline (accuracy, or mAP) over the study's seeds, mean ± std, and its comparison row."""
    if row is None:
        return []
    key, lines = headline(row), []
    if len(seeds) > 1:
        per_seed = ", ".join(f"seed {s}: {_pct(a)}" for s, a in seeds)
        lines = [f"Over the study's {len(seeds)} seeds: **{_pct(row[key])} ± {100 * row[key + '_std']:.2f}** (mean ± std; {per_seed}).", ""]
    return lines + _comparison_row(row)


def _frac(v: Any) -> str:
    return "—" if v is None else f"{float(v):.3f}"


def _card_limits(spec: ExportSpec, hf_config: dict[str, Any], run: Run | None) -> list[str]:
    size, ours = spec.image_size, hf_config["transferlab"]
    dataset = f"`{run.config.data.dataset}`" if run is not None else "the training dataset"
    measured = f"on {run.record.n_test} test images of that dataset" if run is not None else "on the run's test split"
    lines = [
        "## Intended use and limits",
        "",
        (f"- Made to tag images like those of {dataset} with its {spec.num_classes} labels at {size}×{size} px; any other image "
         "still gets the labels whose probability passes their threshold (or none). Check it, and the thresholds, on your own data first."
         if spec.task == "multilabel" else
         f"- Made to classify images like those of {dataset} into its {spec.num_classes} classes at {size}×{size} px; "
         "any other image is still put into one of these classes. Check it on your own data first."),
        f"- The {'mAP' if spec.task == 'multilabel' else 'accuracy'} above was measured {measured}; it says nothing about images "
        "from other sources, cameras or populations, and the model inherits the dataset's biases.",
        "- A research and teaching artifact from a transfer-learning experiment: not for medical, legal, safety or other high-stakes decisions.",
    ]
    if ours["layout"] != "timm":
        how = f"with `{STANDALONE_FILE}` (plain torch) or transferlab" if ours.get("standalone") else "with transferlab"
        lines.append(f"- Plain `timm.create_model` cannot build it: {ours['why_not_timm']}. Load it {how} (above).")
    if ours.get("timm_transform_differs"):
        lines.append(f"- Preprocessing with timm's transform from `pretrained_cfg` is not exact: {ours['timm_transform_differs']}.")
    if run is not None and run.config.model.weights in ("imagenet", "embedded"):
        lines.append("- Fine-tuned from ImageNet weights: their license and terms may apply to these weights too.")
    if run is not None:
        cv = run.record.code_version or {}
        commit = f", commit {cv['git_commit']}" if cv.get("git_commit") else ""
        where = f"experiment `{md_esc(run.config.name)}`, run folder `{md_esc(run.path.name)}`"
        lines += ["", "## Provenance", "", f"transferlab {cv.get('transferlab', '?')}, torch {cv.get('torch', '?')}{commit}; {where}."]
    return [*lines, ""]


def _base_model(run: Run) -> str | None:
    """The hub repo the weights started from, where there is one (for the card's ``base_model``)."""
    weights = run.config.model.weights
    if weights == "imagenet":
        src = run.record.weights_source or ""
        start = src.find("(")
        repo = src[start + 1 : src.find(")", start)] if start >= 0 else ""
        return repo if is_repo_id(repo) else None
    if weights.startswith("hf:") and is_repo_id(weights[3:]) and not Path(weights[3:]).exists():
        return weights[3:].partition("@")[0]
    return None


def _comparison_row(row: dict[str, Any]) -> list[str]:
    key = headline(row)
    acc = _pct(row.get(key)) + (f" ± {100 * row[key + '_std']:.2f}" if row.get("n_seeds", 0) > 1 else "")
    cells = [
        md_esc(row["experiment"]), md_esc(row.get("strategy")), md_esc(row.get("backbone")), md_esc(row.get("weights")), acc,
        str(row.get("n_seeds")), f"{row.get('train_seconds', 0):.1f}", f"{row.get('inference_images_per_s', 0):,.0f}",
        f"{row.get('trainable_params') or 0:,}", md_esc(row.get("data")), md_esc(row.get("status")),
    ]
    return [
        "The experiment's row of the study's comparison table (`transferlab compare`):",
        "",
        f"| experiment | strategy | backbone | weights | test {'mAP' if key == 'test_map' else 'acc'} | seeds | train time (s) | inference img/s "
        "| trainable params | data | status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---|",
        "| " + " | ".join(cells) + " |",
        "",
    ]


def _usage(spec: ExportSpec, hf_config: dict[str, Any]) -> list[str]:
    ours, arch, num_classes = hf_config["transferlab"], hf_config["architecture"], spec.num_classes
    gray = spec.channels == 1
    convert = '.convert("L").convert("RGB")' if gray and spec.in_chans == 3 else f'.convert("{spec.image_mode}")'
    if spec.resize == "pad":  # timm's border mode fills with the mean colour: the run's transform, built from timm's parts
        transform = [
            "from timm.data.transforms import CenterCropOrPad, ResizeKeepRatio",
            "from torchvision import transforms as T",
            f"transform = T.Compose([ResizeKeepRatio({spec.image_size}, longest=1.0, interpolation={spec.interpolation!r}),",
            f"                       CenterCropOrPad({spec.image_size}, fill=0),  # the run padded black, not timm's mean colour",
            "                       T.ToTensor(), T.Normalize(cfg['mean'], cfg['std'])])",
        ]
    else:
        transform = ["transform = timm.data.create_transform(**cfg)  # crop_pct, crop_mode, interpolation: the run's resize"]
    if ours["layout"] == "timm":
        code = [
            "import timm, torch",
            "from PIL import Image",
            "",
            'model = timm.create_model("local-dir:path/to/this/folder", pretrained=True).eval()  # or "hf-hub:<owner/name>"',
            f"# or: timm.create_model({arch!r}, pretrained=True, num_classes={num_classes},",
            f'#         pretrained_cfg_overlay=dict(file="path/to/this/folder/model.safetensors", num_classes={num_classes}))',
            "cfg = timm.data.resolve_data_config(model=model)",
            *transform,
            f'probs = model(transform(Image.open("image.png"){convert}).unsqueeze(0)).softmax(-1)',
            "names = model.pretrained_cfg['label_names']",
        ]
    elif ours.get("standalone"):
        code = [
            "# plain torch + safetensors + Pillow: no transferlab, no timm",
            "import sys",
            'sys.path.insert(0, "path/to/this/folder")',
            f"from {Path(STANDALONE_FILE).stem} import load_model, preprocess",
            "",
            'model, names, config = load_model("path/to/this/folder")',
            'probs = model(preprocess("image.png", config).unsqueeze(0)).softmax(-1)',
            "",
            "# or with transferlab: from transferlab.results.export.hf import load_hf_model; model = load_hf_model(folder).model",
        ]
    else:
        code = [
            "from transferlab.results.export.hf import load_hf_model",
            "",
            'hub = load_hf_model("path/to/this/folder")  # or "<owner/name>": the whole model (backbone and head)',
            "model, names = hub.model, hub.class_names  # a TransferModel; model.preprocess() normalises uint8 N×C×H×W",
        ]
    if spec.task == "multilabel":  # a sigmoid per label and the thresholds chosen on validation, not a softmax
        code = [c.replace(".softmax(-1)", ".sigmoid()  # multi-label: each label's own probability") for c in code] + [
            "",
            "import json",
            'thresholds = json.load(open("path/to/this/folder/config.json"))["thresholds"]  # one per label, chosen on validation',
            *(["# probs = model(<preprocessed batch>).sigmoid()"] if not any(".sigmoid()" in c for c in code) else []),
            "labels = [n for n, p, t in zip(names, probs[0].tolist(), thresholds) if p >= t]",
        ]
    return [
        "## How to use it",
        "",
        "```python",
        *code,
        "```",
        "",
        f"Images are preprocessed as the run did: {spec.recipe()}. `config.json` says the same in timm's words "
        f"(`pretrained_cfg`: crop_pct {hf_config['pretrained_cfg']['crop_pct']:g}, crop_mode `{hf_config['pretrained_cfg']['crop_mode']}`, "
        f"interpolation `{spec.interpolation}`) and in full (`transferlab.spec`).",
        "",
        f"As a starting point for another transferlab study: `model: {{backbone: {ours['backbone']}, weights: \"hf:<folder or owner/name>\"}}` "
        f"(the backbone, loaded strictly; the classifier is replaced by the experiment's head). Input: {spec.image_size}×{spec.image_size} px.",
        "",
    ]


# --------------------------------------------------------------------------------------------
# push


def push_hf(
    run: Run | str | Path,
    repo: str,
    checkpoint: str = "best",
    private: bool = False,
    token: str | None = None,
    message: str | None = None,
) -> str:
    """Export ``run`` to a temporary folder and upload it to hub repo ``repo`` (created if missing); returns its URL.

    Offline (``HF_HUB_OFFLINE``, or the hub not answering within seconds) it fails before any work,
    naming the folder export as the alternative.
    """
    if not is_repo_id(repo) or "@" in repo:
        raise HubError(f"--repo {repo!r}: expected a hub repo id, owner/name")
    run = load_run(run) if isinstance(run, (str, Path)) else run
    if why := hub_unreachable():
        raise HubError(
            f"cannot push {run.path} to {repo}: {why}. Export the folder instead and upload it when online: "
            f"transferlab export {run.path} --format hf --out DIR (then `hf upload {repo} DIR`)"
        )
    with tempfile.TemporaryDirectory(prefix="transferlab-hf-") as tmp:
        folder = Path(tmp) / "model"
        export_hf(run, folder, checkpoint=checkpoint)
        write_json(folder / PARITY_FILE, read_json(parity_path(folder)))  # hub users see the check too
        api = HfApi(token=token, library_name="transferlab")
        try:
            url = api.create_repo(repo, private=private, exist_ok=True)
            api.upload_folder(repo_id=url.repo_id, folder_path=str(folder), commit_message=message or f"transferlab export of {run.config.name}")
        except Exception as e:  # noqa: BLE001 - auth, permission and network errors come in many types
            raise HubError(f"push to {repo} failed ({type(e).__name__}: {str(e)[:300]}); the folder export works offline") from None
    return str(url)
