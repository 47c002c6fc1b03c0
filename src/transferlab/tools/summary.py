"""Model summary: per-stage output shape, parameters (trainable / frozen under a strategy) and FLOPs.

The tables the seed reports wrote by hand ("Residual Block (28, 28, 512) 520,192"), measured on the
model transferlab actually builds::

    transferlab summary resnet50 --input-size 224 --strategy freeze_first --stages 2
    transferlab summary runs/my_study/probe            # the run's backbone, head, strategy and image size

Rows are the backbone's modules in the order the forward pass calls them: its direct children,
except that a child holding several stages (EfficientNet's ``blocks``, ViT's ``blocks``) is opened
up, so every stage gets its own row; ``depth=2`` opens every row one level further (ResNet's
residual blocks). Output shapes are C×H×W of one image (tokens×C for transformers); FLOPs are per
image, counted by ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts 2; only
matmuls and convolutions are counted, as usual). ``group`` is the stage group the row's parameters
belong to (what ``freeze_first: {stages: N}``, ``truncate: {stages: N}`` and ``unfreeze`` count).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from transferlab.config import ConfigError, HeadConfig, ModelConfig, StrategyConfig, TruncateConfig
from transferlab.models.model import build_model
from transferlab.rundir import load_run
from transferlab.strategies import apply_strategy_at_epoch, backbone_stages


@dataclass
class SummaryRow:
    """One module of the table."""

    name: str
    kind: str
    group: str
    output_shape: tuple[int, ...] | None
    params: int
    trainable: int
    flops: int

    @property
    def frozen(self) -> int:
        return self.params - self.trainable


@dataclass
class ModelSummary:
    """The summary of one model at one input size under one strategy."""

    title: str
    input_shape: tuple[int, int, int]
    strategy: str
    rows: list[SummaryRow] = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    total_flops: int = 0
    num_features: int = 0

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        header = ["module", "type", "group", "output shape", "params", "trainable", "frozen", "FLOPs"]
        body = [
            [r.name, r.kind, r.group, _shape(r.output_shape), f"{r.params:,}", f"{r.trainable:,}", f"{r.frozen:,}", _flops(r.flops)]
            for r in self.rows
        ]
        totals = [f"{self.total_params:,}", f"{self.trainable_params:,}", f"{self.frozen_params:,}", _flops(self.total_flops)]
        body.append(["total", "", "", "", *totals])
        return header, body

    def caption(self) -> str:
        c, h, w = self.input_shape
        return f"{self.title} — input {c}×{h}×{w}, strategy {self.strategy}, {self.num_features} pooled features"

    def to_markdown(self) -> str:
        """The table as Markdown (for reports)."""
        header, body = self._cells()
        lines = [f"**{self.caption()}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        """The table as aligned plain text."""
        header, body = self._cells()
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        right = {4, 5, 6, 7}
        def fmt(row: list[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

        return "\n".join([self.caption(), fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)]) + "\n"

    def rich_table(self) -> Any:
        """The table for the terminal (``rich.table.Table``)."""
        from rich.table import Table

        header, body = self._cells()
        table = Table(title=self.caption())
        for i, h in enumerate(header):
            table.add_column(h, justify="right" if i >= 4 else "left")
        for row in body:
            table.add_row(*row)
        return table


def _shape(shape: tuple[int, ...] | None) -> str:
    return "—" if shape is None else "×".join(str(s) for s in shape)


def _flops(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.2f} G"
    if n >= 10**6:
        return f"{n / 1e6:.2f} M"
    if n >= 10**3:
        return f"{n / 1e3:.1f} k"
    return str(n)


def _children_with_params(m: nn.Module) -> bool:
    return any(True for c in m.children() for _ in c.parameters())


@dataclass
class _Trace:
    """One forward pass, observed: the order modules were called in, their output shapes, FLOPs per module."""

    order: dict[str, int]
    shapes: dict[str, tuple[int, ...] | None]
    counts: dict[str, dict[Any, int]]
    total_flops: int


def _trace(model: Any, x: torch.Tensor) -> _Trace:
    names = {id(m): n for n, m in model.named_modules()}
    order: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}

    def pre(mod: nn.Module, _inp: Any) -> None:
        order.setdefault(names[id(mod)], len(order))

    def post(mod: nn.Module, _inp: Any, out: Any) -> None:
        n = names[id(mod)]
        if n not in shapes:
            shapes[n] = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()] + [m.register_forward_hook(post) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    return _Trace(order, shapes, counter.get_flop_counts(), int(counter.get_total_flops()))


def summarize_model(model: Any, input_size: int | tuple[int, int], title: str = "", strategy: str = "", depth: int = 1) -> ModelSummary:
    """Summarize a ``TransferModel`` (as it is: its current trainable set) at ``input_size``."""
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1")
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    c = model.preprocess().in_chans
    trace = _trace(model, torch.zeros(1, c, h, w))
    root = type(model).__name__
    label_of = {id(p): label for label, ps in backbone_stages(model) for p in ps} | {id(p): "new head" for p in model.head.parameters()}

    def groups(m: nn.Module) -> list[str]:
        return list(dict.fromkeys(label_of.get(id(p), "?") for p in m.parameters()))

    rows: list[SummaryRow] = []

    def add(m: nn.Module, name: str, label: str | None = None) -> None:
        ps = list(m.parameters())
        rows.append(SummaryRow(
            name=label or name.removeprefix("backbone."), kind=type(m).__name__, group="+".join(groups(m)),
            output_shape=trace.shapes.get(name), params=sum(p.numel() for p in ps),
            trainable=sum(p.numel() for p in ps if p.requires_grad), flops=int(sum(trace.counts.get(f"{root}.{name}", {}).values())),
        ))

    def visit(parent: nn.Module, prefix: str, level: int) -> None:
        kids = [(f"{prefix}.{n}", m) for n, m in parent.named_children()]
        kids = sorted([k for k in kids if k[0] in trace.order and not isinstance(k[1], nn.Identity)], key=lambda k: trace.order[k[0]])
        for name, m in kids:
            if len(groups(m)) > 1 and _children_with_params(m):
                visit(m, name, level)  # spans several stages: one row per stage
            elif level < depth and _children_with_params(m):
                visit(m, name, level + 1)
            else:
                add(m, name)

    visit(model.backbone, "backbone", 1)
    add(model.head, "head", "new head")
    return ModelSummary(
        title=title or type(model.backbone).__name__,
        input_shape=(c, h, w),
        strategy=strategy or "as set",
        rows=rows,
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_flops=trace.total_flops,
        num_features=model.num_features,
    )


def model_summary(
    target: str | Path,
    input_size: int | None = None,
    strategy: StrategyConfig | None = None,
    head: HeadConfig | None = None,
    truncate: TruncateConfig | None = None,
    num_classes: int | None = None,
    epoch: int = 0,
    depth: int = 1,
) -> ModelSummary:
    """Summary of a timm backbone name or of a run directory (``config.yaml``), see the module docstring.

    For a backbone, the defaults are its pretrained input size, ``finetune``, a linear head and
    1000 classes; for a run, its own image size, strategy, head, truncation and classes (any argument
    given overrides them). ``epoch`` picks the epoch of a gradual-unfreezing schedule.
    """
    path = Path(target)
    if (path / "config.yaml").is_file():
        run = load_run(path)
        cfg = run.config
        model_cfg = dataclasses.replace(cfg.model, weights="scratch", keep_head=False, channels_last=False)
        if truncate is not None:
            model_cfg.truncate = truncate
        head = head or cfg.head
        strategy = strategy or cfg.strategy
        num_classes = num_classes or len(run.class_names) or 10
        input_size = input_size or cfg.data.image_size or int(run.metrics.get("image_size") or 0) or None
        title = f"{path} ({cfg.model.backbone})"
    else:
        name = str(target)
        if path.exists():
            raise ConfigError(f"{path} is not a run directory (no config.yaml) and not a backbone name")
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{name!r} is neither a run directory nor a timm model name{hint}")
        model_cfg = ModelConfig(backbone=name, weights="scratch", truncate=truncate, channels_last=False)
        head = head or HeadConfig()
        strategy = strategy or StrategyConfig(name="finetune")
        num_classes = num_classes or 1000
        title = name
    model, _ = build_model(model_cfg, head, num_classes)
    apply_strategy_at_epoch(model, strategy, epoch)
    if input_size is None:
        input_size = int((model.pretrained_cfg.get("input_size") or (3, 224, 224))[-1])
    desc = strategy.name + "".join(f" {k}={getattr(strategy, k)}" for k in ("stages", "children", "params") if getattr(strategy, k) is not None)
    if epoch:
        desc += f" (epoch {epoch})"
    if model_cfg.truncate is not None:
        title += f", truncated after {model.backbone.truncated_after}"
    return summarize_model(model, input_size, title=title, strategy=desc, depth=depth)
