"""The experiment schema: one dataclass tree per experiment, and the strict dict -> dataclass conversion.

Like timm's ``_pretrained.py`` this module is a leaf: it imports nothing of transferlab. Every key a
user writes is checked against the dataclass fields and its type by ``transferlab.config.convert``,
so ``lr: 1e-3x`` fails before any data is loaded. ``ExperimentConfig.validate`` checks value ranges; the checks that need a registry
(dataset, strategy, head, optimizer, ... names) are added by the layers that own those registries
through ``register_check``, so they run in the same validation step without config importing them.
The fully resolved config (defaults filled in) is what every run directory saves.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transferlab.config.kinds import KindUses, kind_uses

__all__ = [
    "ActivationsConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EarlyStoppingConfig",
    "EmaConfig",
    "EnsembleSpec",
    "ExperimentConfig",
    "FewShotConfig",
    "HeadConfig",
    "InterpolateConfig",
    "L2SpConfig",
    "LookaheadConfig",
    "LrFindConfig",
    "MixupConfig",
    "ModelConfig",
    "PredictConfig",
    "ProbeConfig",
    "ProgressiveResizeConfig",
    "SoupSpec",
    "StrategyConfig",
    "SwaConfig",
    "SweepPoint",
    "TrainConfig",
    "TruncateConfig",
    "UnfreezeConfig",
    "CHOICES",
    "choice_message",
    "register_check",
    "register_choices",
    "resolve_as_recorded",
    "resolve_paths",
    "run_references",
    "resize_scales",
    "unfreeze_milestones",
    "with_run_references",
]


class ConfigError(ValueError):
    """A study file or config dict is invalid. The message names the file, key and value."""


@dataclass
class DataConfig:
    """Which images, how they are split and how they are prepared."""

    dataset: str = "fashion_mnist"
    """Registered dataset name: ``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``cifar100_coarse``,
    ``tiny_imagenet``, ``folder``, ``digits``, ``synthetic`` (see ``transferlab.data``)."""
    root: str | None = None
    """Directory holding the dataset files; ``None`` searches the default locations."""
    image_size: int | None = None
    """Square side the images are resized to, once, at load time. ``None`` keeps the native size."""
    val_fraction: float = 0.1
    """Fraction of the training split held out, stratified and seeded, for validation."""
    train_subset: float | None = None
    """Use only part of the training split: a fraction (<= 1) or a count (> 1), stratified."""
    test_subset: float | None = None
    """Use only part of the test split (fraction or count, stratified). ``None`` = all of it."""
    augment: list[str | dict[str, Any]] = field(default_factory=list)
    """Training augmentations, in order: a registered name or ``{name: parameters}`` — ``flip``, ``vflip``,
    ``crop``, ``translate``, ``rotate``, ``affine``, ``erase``, ``resized_crop``, ``randaugment``, ``trivialaugment``,
    ``autoaugment``, ``augmix`` (see ``transferlab.data.augment``)."""
    val_count: int | None = None
    """Hold out exactly this many training images (stratified) for validation, instead of ``val_fraction``."""
    k_per_class: int | None = None
    """Use exactly this many training images of every class (seeded), instead of ``train_subset``."""
    classes: list[int | str] | None = None
    """Keep only these classes (indices or names), relabelled 0..k-1 in this order."""
    test_fraction: float = 0.2
    """Fixed stratified test split held out of datasets that have none (a ``folder`` without ``test/``)."""
    in_memory: bool | Literal["auto"] = "auto"
    """``true``: decode once into a uint8 tensor, augment in batches on the device; ``false``: PIL DataLoader
    path; ``auto``: in memory when the decoded images fit (``transferlab.data.batches.IN_MEMORY_MAX_BYTES``)."""
    skip_bad_images: bool = False
    """Skip unreadable/corrupt image files (listed and counted in the run) instead of failing."""
    num_workers: int | None = None
    """DataLoader workers of the PIL path; ``None``: all cores but one (at most 8)."""
    sampler: str = "random"
    """Order of the training images each epoch (``transferlab.data.sampler``): ``random`` (a seeded permutation,
    every image once) or ``balanced`` (as many draws with replacement, every class equally likely)."""
    folds: int | None = None
    """k-fold cross-validation: the labelled images (train + test pooled) are cut into this many stratified,
    seeded folds; a study runs the experiment once per fold with that fold as its test split (``data.fold``)."""
    fold: int | None = None
    """Which fold (0..folds-1) is this run's test split; set per run by a study's expansion of ``folds``."""
    resize: Literal["crop", "pad", "stretch"] = "crop"
    """How ``image_size`` is reached: ``crop`` (shorter side to size / crop_pct, center crop: timm's eval
    transform), ``pad`` (longer side to size, letterboxed with black), ``stretch`` (both sides, distorting).
    Square images come out the same with ``crop`` and ``stretch`` (at ``crop_pct: 1``)."""
    crop_pct: float = 1.0
    """``resize: crop``: the center crop keeps this share of the shorter side (timm's ``crop_pct``; 0.875 for
    most ImageNet models). 1.0 keeps the whole shorter side, so square datasets resize as they always did."""
    normalize: Literal["backbone", "dataset", "none"] = "backbone"
    """Input normalisation: ``backbone`` (its pretrained config's mean/std), ``dataset`` (per-channel mean/std
    of the training split, recorded in ``selection.json``), ``none`` (pixels / 255)."""
    task: Literal["multiclass", "multilabel"] = "multiclass"
    """``multiclass``: one label per image; ``multilabel``: any number of labels per image (a multi-hot target; sigmoid
    outputs, ``train.loss: bce`` / ``asymmetric``, mAP, thresholds chosen on validation — ``docs/multilabel.md``)."""
    label_sep: str = ";"
    """``task: multilabel``, a CSV/JSON-lines list with one ``labels`` column: the character between an image's labels."""
    synthetic_classes: int = 4
    """Number of classes of the ``synthetic`` dataset (tests only)."""
    synthetic_size: int = 256
    """Images per split of the ``synthetic`` dataset (tests only)."""


@dataclass
class TruncateConfig:
    """Keep the backbone only up to a cut (exactly one key). See ``transferlab.models.truncate``."""

    stages: int | None = None
    """Keep the stem and the first N stages (timm's coarse stages, as in ``freeze_first``)."""
    after: str | None = None
    """Keep everything up to and including this module (e.g. ``layer2`` or ``layer2.2``)."""


@dataclass
class ModelConfig:
    """The backbone and where its weights come from."""

    backbone: str = "transferlab_cnn"
    """Any timm model name, or a transferlab built-in such as ``transferlab_cnn``."""
    weights: str = "scratch"
    """``scratch`` | ``imagenet`` (timm hub) | ``embedded`` (offline ImageNet EfficientNet-Lite0/1/2) | ``file:<path>``
    | ``run:<run dir or experiment of this study>`` (the backbone of an earlier run)
    | ``hf:<folder or owner/name>`` (a Hugging Face Hub folder or repo, e.g. a ``transferlab export --format hf``)."""
    truncate: TruncateConfig | None = None
    """Cut the backbone after its first stages (``{stages: 2}``) or after a module (``{after: layer2}``)."""
    keep_head: bool = False
    """With ``weights: run:…``: also load that run's head (same head and classes) instead of a new one."""
    drop_rate: float = 0.0
    """Dropout inside the backbone where the architecture supports it."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on CPU and GPU)."""
    image_size: int | None = None
    """The input size a fixed-input-size backbone (ViT, DeiT, Swin, any timm model taking ``img_size``) is built at.
    Filled from ``data.image_size`` when the config is read, so every rebuild of the model (``load_run``, exports)
    has it; other backbones ignore it. Set it only to the value of ``data.image_size``."""


@dataclass
class HeadConfig:
    """The new classifier put on top of the backbone's pooled features."""

    type: str = "linear"
    """Registered head: ``linear`` (dropout → fc), ``mlp`` (fc → ReLU → dropout → fc), ``conv`` (on the
    unpooled features; see ``transferlab.models.heads``)."""
    hidden: int = 256
    """Hidden width of the ``mlp`` and ``conv`` heads."""
    dropout: float = 0.0
    """Dropout before the (last) linear layer of the head."""
    conv_channels: int = 32
    """``conv`` head: filters of its convolution (on the unpooled features)."""
    kernel_size: int = 3
    """``conv`` head: kernel size of its convolution ('same' padding)."""


@dataclass
class UnfreezeConfig:
    """Unfreeze-by-milestones: ``{at_epochs: [2, 4], stages_per_step: 1}``."""

    at_epochs: list[int] = field(default_factory=list)
    """Epochs (0-based, strictly increasing, >= 1) at whose start the next stages unfreeze."""
    stages_per_step: int | None = 1
    """Stage groups unfrozen per milestone, topmost frozen first; ``null`` = all of them at once."""


@dataclass
class StrategyConfig:
    """What trains. See ``transferlab.strategies`` for the list."""

    name: str = "finetune"
    """Registered strategy: ``scratch``, ``finetune``, ``linear_probe``, ``freeze_first``, ``bn_only``, ``norm_only``,
    ``bitfit``, ``lora`` (needs ``pip install 'transferlab[peft]'``), ``vpt``."""
    stages: int | None = None
    """``freeze_first``: freeze the stem and the first N stages (timm's coarse layer groups)."""
    children: int | None = None
    """``freeze_first``: freeze the first N direct children of the backbone (``named_children``)."""
    params: int | None = None
    """``freeze_first``: freeze the first N parameter tensors (``named_parameters`` order)."""
    unfreeze: UnfreezeConfig | None = None
    """Gradual unfreezing: at these epochs the next frozen stages (from the top) start to train."""
    freeze_epochs: int | None = None
    """fastai's ``fine_tune``: the strategy's frozen part trains too from this epoch on (all at once)."""
    rank: int = 8
    """``lora``: rank of the low-rank update of every targeted Linear / Conv2d layer."""
    alpha: float = 16.0
    """``lora``: scaling of the update (``alpha / rank``), as in HF peft's ``lora_alpha``."""
    dropout: float = 0.0
    """``lora``: dropout on the adapter's input (peft's ``lora_dropout``)."""
    targets: str | list[str] = "auto"
    """``lora``: ``auto`` (the per-architecture table: attention and MLP projections of transformer blocks, the
    convolutions of CNN stages) or a list of layer-name patterns (``qkv``, ``blocks.11``, ``layer4.*.conv2``)."""
    prompts: int = 10
    """``vpt``: number of learnable prompt tokens inserted after the class (and register) tokens."""
    deep: bool = False
    """``vpt``: fresh prompt tokens in front of every transformer block (VPT-deep) instead of only the first."""
    probe_epochs: int | None = None
    """``lp_ft``: epochs of the linear-probe phase (head only, on cached features) before everything is fine-tuned for
    the remaining ``train.epochs - probe_epochs`` epochs (Kumar et al. 2022); must be >= 1 and < ``train.epochs``."""


@dataclass
class EarlyStoppingConfig:
    monitor: Literal["val_acc", "val_loss", "val_map"] = "val_acc"
    """Metric used for early stopping and for choosing the best checkpoint (``val_map``: macro mAP, multi-label only;
    with ``data.task: multilabel`` the default ``val_acc`` means ``val_map``)."""
    patience: int | None = None
    """Stop after this many epochs without improvement. ``None`` never stops early."""
    min_delta: float = 0.0
    keep: Literal["best", "last"] = "best"
    """Which epoch's weights are kept as ``best`` and tested: ``best`` (of ``monitor``) or ``last`` (the final epoch's,
    e.g. an EMA at the end of a decaying schedule, which a small validation split's noise would swap for an earlier
    epoch; ``monitor`` is still logged, and ``patience`` does not apply)."""


@dataclass
class MixupConfig:
    """``train.mixup``: Mixup / CutMix of every training batch, with timm's ``Mixup`` semantics (batch mode)."""

    alpha: float | None = 1.0
    """Mixup's Beta(alpha, alpha) for the mixing weight lambda; ``null``: no mixup (CutMix only; timm's 0)."""
    cutmix_alpha: float | None = None
    """CutMix's Beta(alpha, alpha) for the kept area; ``null``: no CutMix (timm's 0)."""
    prob: float = 1.0
    """Probability that a batch is mixed at all."""
    switch_prob: float = 0.5
    """With both set: probability that a mixed batch uses CutMix instead of mixup."""
    label_smoothing: float = 0.1
    """Label smoothing of the mixed soft targets (timm's default; replaces ``train.label_smoothing``)."""


@dataclass
class LrFindConfig:
    """``train.lr_find``: an exponential learning-rate sweep on a copy of the model (``transferlab.engine.lr_find``)."""

    rule: str = "valley"
    """Registered suggestion rule: ``valley`` (fastai's default: inside the longest descent of the smoothed loss) or
    ``steepest`` (the most negative slope of the smoothed loss against log lr)."""
    start: float = 1e-7
    end: float = 10.0
    """The sweep's first and last learning rate (geometric steps between them)."""
    steps: int = 100
    """Optimizer steps of the sweep, at most (it stops early when the loss diverges)."""
    diverge: float = 4.0
    """Stop when the smoothed loss exceeds this multiple of its best value (fastai's and Lightning's 4), or is not finite."""
    found: float | None = None
    """Set by a run with ``train.lr: find`` (not written by hand): the lr it found, also its ``train.lr`` in ``config.yaml``."""


@dataclass
class LookaheadConfig:
    """``train.lookahead``: Lookahead (Zhang et al. 2019) around ``train.optimizer``, with timm's ``Lookahead``: every
    ``k`` steps the slow weights move ``alpha`` of the way to the fast ones, and the fast ones restart from there."""

    k: int = 5
    """Fast optimizer steps between two syncs of the slow weights (the paper's 5 or 10)."""
    alpha: float = 0.5
    """The slow weights' step toward the fast ones, in (0, 1]."""


@dataclass
class ProgressiveResizeConfig:
    """``train.progressive_resize``: smaller training images in the first epochs, growing to the data's size (fastai's
    progressive resizing; Howard 2018): early epochs cost about ``scale²`` of a full-size one. Validation, test and every
    later epoch see full-size images; only the training batches are resized (bilinear, antialiased)."""

    start: float = 0.7
    """The first epoch's image side as a fraction of the data's side, in (0, 1): 0.7 trains 28 px images at 20 px."""
    fraction: float = 0.5
    """Share of ``train.epochs`` over which the side grows linearly from ``start`` to full; the rest train at full size."""


def resize_scales(tc: TrainConfig) -> list[float]:
    """The side of every epoch's training images as a fraction of the data's (``train.progressive_resize``; all 1.0
    without it): linear from ``start`` over the first ``round(fraction * epochs)`` epochs (at least one), then 1.0."""
    pr, n = tc.progressive_resize, tc.epochs
    if pr is None:
        return [1.0] * n
    grow = max(1, round(pr.fraction * n))
    return [pr.start + (1.0 - pr.start) * e / grow if e < grow else 1.0 for e in range(n)]


@dataclass
class EmaConfig:
    """``train.ema``: an exponential moving average of the weights (``transferlab.engine.ema``)."""

    decay: float = 0.999
    """Decay per optimizer step, in (0, 1)."""
    warmup: bool = True
    """timm's warm-up: step t uses min(decay, 1 - (1 + t)^(-2/3)), so early weights fade fast in short runs."""
    evaluate: Literal["ema", "raw", "both"] = "ema"
    """Weights validated, kept as ``best`` and tested: ``ema``, ``raw`` (the EMA is only kept in the checkpoints), or
    ``both`` (both validated and tested; the EMA ones are the run's result)."""


@dataclass
class L2SpConfig:
    """``train.l2_sp``: L2-SP (Li et al. 2018), a penalty toward the starting weights (``transferlab.engine.losses``)."""

    alpha: float = 0.01
    """Strength of ``alpha/2 · ‖w − w0‖²`` over the trainable backbone parameters (w0: the weights the run started from)."""
    beta: float = 0.01
    """Strength of the plain L2 penalty ``beta/2 · ‖w‖²`` on the new head's trainable parameters."""


@dataclass
class SwaConfig:
    """``train.swa``: stochastic weight averaging (``torch.optim.swa_utils``, ``transferlab.engine.swa``)."""

    start: float = 0.75
    """When averaging starts, as a fraction of ``train.epochs`` in (0, 1): from (0-based) epoch ``floor(start * epochs)`` on, the
    weights at the end of every epoch join the average and the lr follows ``SWALR``."""
    lr: float | None = None
    """The constant SWA learning rate (``SWALR``'s ``swa_lr``); ``null``: half of ``train.lr``."""
    anneal_epochs: int = 1
    """Epochs over which the lr is annealed (cosine) from the schedule's value to ``lr`` once averaging started."""


@dataclass
class DistillConfig:
    """``train.distill``: knowledge distillation from a finished run (``transferlab.engine.distill``)."""

    teacher: str = ""
    """``run:<experiment or run directory>``: a finished run with the same class names; frozen, it sees the same
    augmented batch, resized to its own input size and normalised its own way."""
    alpha: float = 0.5
    """Weight of the distillation term: loss = (1 - alpha) * hard loss + alpha * T^2 * KL(teacher_T || student_T)."""
    temperature: float = 4.0
    """Softmax temperature T of both teacher and student in the distillation term (Hinton et al. 2015)."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 128
    """Batch of validation, test, predictions and ensembles. 128: on a CPU larger batches are slower
    (512 measured 1.7-2.4x slower for three of four models, benchmarks/eval_batch.py); raise it on a GPU."""
    tta: str = "none"
    """Test-time augmentation for validation and test (and ``predict``, ensembles): ``flip`` averages the
    softmax of each image and its horizontal mirror (train with ``data.augment: [flip]``), twice the inference cost;
    ``flip_translate`` adds the mirror pairs of the image shifted one pixel up-left and down-right (airbench's six views;
    train with a crop augmentation too), six times the cost. ``kind: train`` only; frozen-feature caching is off with it
    (the cache holds unflipped images)."""
    optimizer: str = "adamw"
    """Registered optimizer: ``sgd`` (Nesterov momentum), ``adam``, ``adamw``, ``rmsprop`` (``transferlab.engine.optim``)."""
    lr: float | Literal["find"] = 1e-3
    """Learning rate (of the head's group with ``lr_ratio``); ``find``: chosen by the LR finder before training
    (``lr_find``, ``transferlab.engine.lr_find``) and recorded as the number it found in the run's ``config.yaml``."""
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)
    """The LR finder's sweep and rule: ``train.lr: find`` and ``transferlab lr-find``."""
    lr_ratio: float | list[float] | None = None
    """Discriminative learning rates: a ratio per stage going down (head ``lr``, top stage ``lr·r``, …,
    stem ``lr·r^n``), or one multiplier of ``lr`` per group from the stem to the head."""
    weight_decay: float = 0.0
    momentum: float = 0.9
    """Momentum for sgd and rmsprop."""
    schedule: str = "cosine"
    """Registered schedule: ``cosine`` (with ``warmup_epochs``), ``step``, ``onecycle``, ``none``."""
    step_size: int = 10
    """``step`` schedule: epochs between decays."""
    gamma: float = 0.1
    """``step`` schedule: decay factor."""
    warmup_epochs: float = 0.0
    """Linear warm-up length (epochs) for ``cosine``."""
    label_smoothing: float = 0.0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    accelerator: str = "auto"
    """Lightning Fabric accelerator: ``auto``, ``cpu``, ``cuda``."""
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"] = "auto"
    """Lightning Fabric precision; the default ``auto`` (``transferlab.engine.precision``): ``bf16-mixed`` on CPUs with
    native bf16 (AVX512-BF16 / AMX, detected from the CPU flags) and on CUDA devices that support bf16, ``32-true``
    otherwise; resolved before the run starts and recorded in ``config.yaml`` and the comparison table (a resumed run
    keeps what it recorded). Results depend on it: bf16 rounds activations to 8 bits of mantissa. ``bf16-mixed``
    measured 1.85x the fp32 training step on an AVX512-BF16 CPU. Set ``32-true`` for the same numbers on every machine."""
    compile: bool = False
    """Train through ``torch.compile`` (opt-in: the first steps pay the compile time, and on the CPU it
    needs a C++ compiler). Checkpoints and evaluation use the plain module, so runs stay interchangeable."""
    max_grad_norm: float | None = None
    checkpoint_every_steps: int | None = None
    """Also write the ``last`` checkpoint every N optimizer steps inside an epoch (exact mid-epoch resume)."""
    checkpoint_every_minutes: float | None = 10.0
    """Also write the ``last`` checkpoint when this much time passed since the previous one."""
    progress: bool = True
    """Show progress bars."""
    cache: Literal["auto", "on", "off"] = "auto"
    """Frozen-prefix feature caching (``transferlab.engine.features``): ``auto`` trains on cached features whenever the
    frozen part can be cut off exactly; ``on`` requires it (an error says why not); ``off`` never caches."""
    cache_views: int = 0
    """With ``data.augment``: cache this many augmented views of every training image (epoch e uses view e mod K);
    0 = caching is off for augmented runs."""
    mixup: MixupConfig | None = None
    """Mixup / CutMix of the training batches (``{alpha: 0.2}``, ``{cutmix_alpha: 1.0}``, ...); ``null`` = off."""
    ema: EmaConfig | None = None
    """EMA of the weights (``{decay: 0.999, evaluate: both}``); ``null`` = off."""
    lookahead: LookaheadConfig | None = None
    """Lookahead around the optimizer (``{k: 5, alpha: 0.5}``); ``null`` = off."""
    progressive_resize: ProgressiveResizeConfig | None = None
    """Progressive resizing of the training images (``{start: 0.7, fraction: 0.5}``); ``null`` = off. ``kind: train``
    only; the feature cache is off with it (it holds full-size images' features)."""
    loss: str = "cross_entropy"
    """Registered training loss (``transferlab.engine.losses``): ``cross_entropy`` or ``focal`` (``focal_gamma``); multi-label:
    ``bce`` (BCE with logits) or ``asymmetric`` (Ridnik et al. 2021). With ``data.task: multilabel`` the default
    ``cross_entropy`` means ``bce``."""
    threshold: Literal["global", "per_class"] | float = "global"
    """``data.task: multilabel``: the probability above which a label is predicted — ``global`` (one threshold, the best
    micro F1 on the validation split), ``per_class`` (each class its best F1 on validation; a class with no validation
    positive gets the global one) or a fixed number in (0, 1). Recorded in ``metrics.json``; used for test and ``predict``,
    never chosen on test."""
    focal_gamma: float = 2.0
    """``loss: focal``: the focusing exponent gamma (0 = cross-entropy)."""
    asl_gamma_neg: float = 4.0
    """``loss: asymmetric``: the focusing exponent of the negative labels, gamma- (Ridnik et al. 2021: 4)."""
    asl_gamma_pos: float = 0.0
    """``loss: asymmetric``: the focusing exponent of the positive labels, gamma+ (Ridnik et al. 2021: 0)."""
    asl_clip: float = 0.05
    """``loss: asymmetric``: the probability margin m of the negatives, p_m = max(p - m, 0) (0 = none; paper: 0.05).
    With both gammas and the margin 0 the loss is ``bce``."""
    class_weights: Literal["balanced"] | list[float] | None = None
    """Per-class loss weights: ``balanced`` (n / (classes * n_c) on the training split) or one weight per class."""
    calibrate: Literal["none", "temperature"] = "none"
    """``temperature``: fit one temperature T > 0 on the validation logits (L-BFGS on the NLL) and report the test
    calibration before and after dividing the logits by T (``transferlab.engine.calibration``); never fitted on test."""
    layer_decay: float | None = None
    """Layer-wise lr decay in (0, 1] (timm's ``param_groups_layer_decay`` over the backbone's ``group_matcher``): the
    top block and the head train at ``lr``, each block below at ``layer_decay`` times the one above; biases and norm
    parameters get no weight decay (timm's rule). Every group's lr is in ``history.csv`` (``lr_group<i>``)."""
    l2_sp: L2SpConfig | None = None
    """L2-SP toward the starting (pretrained) weights: ``{alpha: 0.01, beta: 0.01}``; ``null`` = off. Needs
    pretrained (or ``run:``) weights: a scratch start has nothing to stay close to."""
    swa: SwaConfig | None = None
    """Stochastic weight averaging: ``{start: 0.75, lr: 0.001}``; the averaged weights (BatchNorm statistics recomputed
    on the training images) are the run's tested weights; ``null`` = off."""
    distill: DistillConfig | None = None
    """Knowledge distillation: ``{teacher: run:<experiment>, alpha: 0.5, temperature: 4}``; ``null`` = off."""


@dataclass
class SweepPoint:
    """Where an experiment sits in a sweep: the study entry it was expanded from and its swept values."""

    group: str = ""
    """Name of the study entry whose ``sweep:`` produced this experiment (shared by all its points)."""
    values: dict[str, Any] = field(default_factory=dict)
    """Dotted key -> value of this point, e.g. ``{'head.dropout': 0.3}``."""


@dataclass
class ProbeConfig:
    """``kind: logistic`` / ``kind: knn``: classifiers fitted on the frozen backbone's cached pooled features."""

    l2: list[float] = field(default_factory=lambda: [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0])
    """``logistic``: L2 strengths tried (loss = mean cross-entropy + l2/2 * |W|^2 on standardised features); the best on val is kept."""
    max_iter: int = 1000
    """``logistic``: L-BFGS iterations per L2 strength, at most."""
    k: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20, 50, 100, 200])
    """``knn``: neighbour counts tried (cosine similarity); the best on val is kept."""
    temperature: float = 0.07
    """``knn``: each neighbour votes with weight exp(similarity / temperature) (DINO's weighted k-NN)."""


@dataclass
class FewShotConfig:
    """``kind: fewshot``: N-way K-shot episodes classified by Prototypical Networks on the backbone's features."""

    ways: int = 5
    shots: int = 5
    queries: int = 15
    """Query images per class and episode."""
    episodes: int = 600
    distance: Literal["euclidean", "cosine"] = "euclidean"
    """Distance to the prototypes reported as ``test_acc`` (the other one is reported beside it, same episodes)."""
    split: Literal["train", "val", "test"] = "test"
    """Split the evaluation episodes are drawn from."""
    classes: list[int | str] | None = None
    """Classes the evaluation episodes are drawn from (names or indices of the task's classes); ``None`` = all."""
    finetune_episodes: int = 0
    """Episodic ProtoNet fine-tuning of the backbone on the train split before evaluating (``strategy`` says what
    trains; ``train.optimizer``/``lr``/``weight_decay`` how); 0 = none."""
    finetune_classes: list[int | str] | None = None
    """Classes of the fine-tuning episodes; ``None`` = the classes not in ``classes`` (all when ``classes`` is ``None``)."""


@dataclass
class EnsembleSpec:
    """``kind: ensemble``: a vote over finished runs (``transferlab.kinds.ensemble``)."""

    members: list[str] = field(default_factory=list)
    """Run directories (in a study file's ``ensembles:``, experiments of the study, resolved to their runs)."""
    vote: Literal["hard", "soft"] = "hard"
    """``hard`` (majority of the members' classes) or ``soft`` (highest mean probability)."""


@dataclass
class InterpolateConfig:
    """``soup.interpolate``: WiSE-FT (Wortsman et al. 2022), weights ``(1 - a) * base + a * soup`` for each alpha."""

    base: str = ""
    """``run:<experiment or run directory>``: the weights at alpha 0 (a linear probe, or any run of the same
    architecture and classes). (``from`` in the paper; a Python keyword, hence ``base``.)"""
    alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    """Mixing coefficients in [0, 1] tried; the one with the best validation accuracy is kept (never the test split)."""


@dataclass
class SoupSpec:
    """``kind: soup``: the weights of finished runs of one architecture averaged into one model (``transferlab.kinds.soup``)."""

    members: list[str] = field(default_factory=list)
    """Experiments of the study (resolved to their runs) or run directories, of the same architecture and classes."""
    method: Literal["uniform", "greedy"] = "uniform"
    """``uniform``: the mean of all members; ``greedy``: members in order of validation accuracy, each kept only if the
    soup's validation accuracy improves (Wortsman et al. 2022)."""
    interpolate: InterpolateConfig | None = None
    """WiSE-FT between ``base`` and the soup (one member: the fine-tuned run itself); ``null`` = off."""
    fingerprints: dict[str, str] = field(default_factory=dict)
    """Recorded by the run (not written by hand): member run directory -> hash of the checkpoint it averaged, so a
    member deleted or changed later is reported on ``--resume``."""


@dataclass
class PredictConfig:
    """``predict:``: after training, the top-k classes of image files from outside the dataset (``transferlab.tools.inspect``)."""

    images: list[str] = field(default_factory=list)
    """Image files or folders (searched recursively); in a study file, relative paths start at the study file's folder."""
    top_k: int = 5
    """Classes recorded per image, most probable first."""


@dataclass
class ActivationsConfig:
    """``activations:``: after training, feature maps of chosen layers for image files, one PNG per image."""

    images: list[str] = field(default_factory=list)
    """Image files or folders; in a study file, relative paths start at the study file's folder."""
    layers: list[str] | None = None
    """Module names of the run's model (``backbone.conv1``, ``backbone.layer2``); ``null``: the first and a middle stage."""
    max_maps: int = 16
    """Feature maps shown per layer (its strongest channels by mean activation)."""
    gradcam: bool = False
    """Add the Grad-CAM heat map of the predicted class."""
    gradcam_layer: str = "features"
    """Layer of the Grad-CAM: ``features`` (the backbone's final feature map) or a module name."""


PATH_KEYS = (("predict", "images"), ("activations", "images"))
"""(section, field) lists of paths that a study file gives relative to its own folder (``resolve_paths``)."""


@dataclass
class ExperimentConfig:
    """One experiment of a study: data, model, head, strategy and training settings."""

    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    notes: str = ""
    """Free text shown in the comparison table (e.g. 'train subset 6 000, 32 px')."""
    kind: str = "train"
    """Registered experiment kind (``transferlab.kinds``): ``train`` (the training loop); ``logistic`` / ``knn``
    (a probe on cached frozen features, ``probe``); ``fewshot`` (ProtoNet episodes, ``fewshot``); ``ensemble``
    (a vote over finished runs, ``ensemble``); ``soup`` (the weights of finished runs averaged, WiSE-FT, ``soup``)."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)
    ensemble: EnsembleSpec = field(default_factory=EnsembleSpec)
    soup: SoupSpec = field(default_factory=SoupSpec)
    """``kind: soup``: members, ``uniform`` / ``greedy``, WiSE-FT interpolation."""
    sweep: SweepPoint | None = None
    """Set by a study's ``sweep:``: which sweep this experiment is a point of, and its values (not written by hand)."""
    tracking: list[str] | dict[str, dict[str, Any] | None] = field(default_factory=list)
    """Where the run is also logged while it runs (``transferlab.engine.tracking``): registered tracker names
    (``tensorboard``, ``mlflow``), or a mapping of name -> options. Cannot change results: ``--resume`` allows a change."""
    predict: PredictConfig = field(default_factory=PredictConfig)
    """Top-k predictions on outside image files after training (``kind: train``)."""
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    """Feature maps of outside image files after training (``kind: train``)."""

    def __post_init__(self) -> None:
        # multi-label: the multiclass defaults mean their multi-label counterparts, so the resolved config.yaml says what
        # really ran (softmax cross-entropy and accuracy have no multi-label meaning here)
        if self.data.task == "multilabel":
            if self.train.loss == "cross_entropy":
                self.train = dataclasses.replace(self.train, loss="bce")
            if self.train.early_stopping.monitor == "val_acc":
                self.train = dataclasses.replace(
                    self.train, early_stopping=dataclasses.replace(self.train.early_stopping, monitor="val_map"))
        # the model section records the size a fixed-input-size backbone is built at, so every rebuild of the model
        # (load_run, export, the HF folder) has it without the data section
        if self.model.image_size is None and self.data.image_size is not None:
            self.model = dataclasses.replace(self.model, image_size=self.data.image_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def multilabel(self) -> bool:
        """``data.task: multilabel``: any number of labels per image."""
        return self.data.task == "multilabel"

    @property
    def uses(self) -> KindUses:
        """What this experiment's kind uses of the config (declared by the kind: ``transferlab.config.kinds``)."""
        return kind_uses(self.kind)

    def error(self, message: str) -> ConfigError:
        """A ConfigError for this experiment: ``experiment '<name>': <message>``."""
        return ConfigError(f"experiment '{self.name}': {message}")

    def validate(self) -> None:
        """Check the registered choices, value ranges that types alone cannot express, then the registered checks."""
        for (cls, name), names in CHOICES.items():
            value = getattr(_section(self, cls), name)
            if value not in names():
                raise self.error(choice_message(name_of(cls, name), value, names()))
        for ok, key, value, why in _range_checks(self):
            if not ok:
                raise self.error(f"{key}={value!r} {why}")
        for check in _CHECKS:
            check(self)


# --------------------------------------------------------------------------------------------
# validation


ExperimentCheck = Callable[[ExperimentConfig], None]
_CHECKS: list[ExperimentCheck] = []

CHOICES: dict[tuple[type, str], Callable[[], list[str]]] = {}
"""(section class, field) -> the names it may take: fields whose choices are a registry of a higher layer."""

_SECTIONS = {"ExperimentConfig": "", "DataConfig": "data", "ModelConfig": "model", "HeadConfig": "head",
             "StrategyConfig": "strategy", "TrainConfig": "train", "EnsembleSpec": "ensemble", "SoupSpec": "soup"}


def register_choices(cls: type, name: str, names: Callable[[], list[str]]) -> None:
    """Field ``cls.name`` takes one of ``names()`` (e.g. ``TrainConfig.optimizer`` -> the registered optimizers).

    Checked like a ``Literal`` when a config is read (``from_dict``) and again by ``validate``; the
    registry stays in its own layer and config imports none.
    """
    if cls.__name__ not in _SECTIONS or name not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(f"{cls.__name__}.{name} is no config field")  # programming error
    CHOICES[(cls, name)] = names


def choice_message(where: str, value: Any, allowed: Iterable[str]) -> str:
    """``where: 'x' is not one of 'a', 'b' (did you mean 'a'?)`` — the error of a bad choice, Literal or registered."""
    allowed = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}{hint}"


def name_of(cls: type, name: str) -> str:
    """The dotted key of field ``name`` of section ``cls`` (``train.optimizer``, ``kind``)."""
    section = _SECTIONS[cls.__name__]
    return f"{section}.{name}" if section else name


def _section(cfg: ExperimentConfig, cls: type) -> Any:
    section = _SECTIONS[cls.__name__]
    return getattr(cfg, section) if section else cfg


def register_check(check: ExperimentCheck) -> ExperimentCheck:
    """Add a step to ``ExperimentConfig.validate`` (decorator). It raises ``cfg.error(...)`` on a bad value.

    The layers above config register the checks that need their registries (the dataset name in
    ``transferlab.data``, the strategy in ``transferlab.strategies``, ...), so every experiment of a
    study is checked in one step before any data is loaded, and config imports none of them.
    """
    _CHECKS.append(check)
    return check


def unfreeze_milestones(cfg: StrategyConfig) -> tuple[list[int], int | None]:
    """(epochs at which frozen stages unfreeze, stage groups per step; ``None`` = all at once)."""
    if cfg.freeze_epochs is not None:
        return [cfg.freeze_epochs], None
    if cfg.unfreeze is not None:
        return list(cfg.unfreeze.at_epochs), cfg.unfreeze.stages_per_step
    return [], None


Check = tuple[bool, str, Any, str]  # (ok, dotted key, value, why it is wrong)


MULTILABEL_LOSSES = ("bce", "asymmetric")
"""The registered losses of ``data.task: multilabel`` (sigmoid per class); every other loss is multiclass (softmax)."""


def _task_checks(cfg: ExperimentConfig) -> Iterable[Check]:
    """``data.task`` against what depends on it: the loss, the monitor, the kind, the selections without a meaning."""
    t, d, ml = cfg.train, cfg.data, cfg.multilabel
    if ml:
        yield (t.loss in MULTILABEL_LOSSES, "train.loss", t.loss,
               f"is a multiclass (softmax) loss; data.task: multilabel trains with {' or '.join(MULTILABEL_LOSSES)}")
        yield (cfg.uses.multilabel, "kind", cfg.kind, "does not support data.task: multilabel (one label per image only)")
        yield (d.k_per_class is None, "data.k_per_class", d.k_per_class,
               "has no meaning with data.task: multilabel (an image has several classes); use data.train_subset")
        yield (d.sampler != "balanced", "data.sampler", d.sampler, "balanced draws by one class per image: not with data.task: multilabel")
        yield (t.label_smoothing == 0, "train.label_smoothing", t.label_smoothing, "is not defined for data.task: multilabel")
        yield (isinstance(t.threshold, str) or 0 < t.threshold < 1, "train.threshold", t.threshold, "must be in (0, 1), global or per_class")
    else:
        yield (t.loss not in MULTILABEL_LOSSES, "train.loss", t.loss,
               "is a multi-label loss: set data.task: multilabel, or use cross_entropy / focal")
        yield (t.early_stopping.monitor != "val_map", "train.early_stopping.monitor", "val_map", "is multi-label only (data.task: multilabel)")
        yield (t.threshold == "global", "train.threshold", t.threshold, "is for data.task: multilabel only")


def _range_checks(cfg: ExperimentConfig) -> Iterable[Check]:
    t, d, h = cfg.train, cfg.data, cfg.head
    yield from [
        (t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1"),
        (t.lr == "find" or t.lr > 0, "train.lr", t.lr, "must be > 0 (or 'find': the LR finder)"),
        (t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1"),
        (t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0"),
        (0 <= t.label_smoothing < 1, "train.label_smoothing", t.label_smoothing, "must be in [0, 1)"),
        (0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)"),
        (0 <= h.dropout < 1, "head.dropout", h.dropout, "must be in [0, 1)"),
        (h.hidden >= 1, "head.hidden", h.hidden, "must be >= 1"),
        (d.image_size is None or d.image_size >= 8, "data.image_size", d.image_size, "must be >= 8"),
    ]
    for key in ("train_subset", "test_subset"):
        v = getattr(d, key)
        yield (v is None or v > 0, f"data.{key}", v, "must be > 0 (fraction <= 1 or count > 1)")
    yield from [
        (d.val_count is None or d.val_count >= 1, "data.val_count", d.val_count, "must be >= 1"),
        (d.k_per_class is None or d.k_per_class >= 1, "data.k_per_class", d.k_per_class, "must be >= 1"),
        (d.k_per_class is None or d.train_subset is None, "data.k_per_class", d.k_per_class, "and data.train_subset cannot both be set"),
        (0 < d.test_fraction < 1, "data.test_fraction", d.test_fraction, "must be in (0, 1)"),
        (d.num_workers is None or d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0"),
        (d.classes is None or len(d.classes) >= 2, "data.classes", d.classes, "must list at least 2 classes"),
        (d.classes is None or len(set(map(str, d.classes))) == len(d.classes), "data.classes", d.classes, "lists a class twice"),
        (d.classes is None or all(isinstance(c, str) or c >= 0 for c in d.classes), "data.classes", d.classes, "has a negative index"),
    ]
    yield from _task_checks(cfg)
    yield from _kind_checks(cfg)
    yield from _surgery_checks(cfg)
    yield from _recipe_checks(cfg)
    yield from _lr_find_checks(cfg)
    yield from _inspect_checks(cfg)
    yield from _finetuning_checks(cfg)


def _kind_checks(cfg: ExperimentConfig) -> Iterable[Check]:
    pr, fs = cfg.probe, cfg.fewshot
    return [
        (cfg.train.cache_views >= 0, "train.cache_views", cfg.train.cache_views, "must be >= 0"),
        (bool(pr.l2) and all(v > 0 for v in pr.l2), "probe.l2", pr.l2, "must be a non-empty list of numbers > 0"),
        (pr.max_iter >= 1, "probe.max_iter", pr.max_iter, "must be >= 1"),
        (bool(pr.k) and all(v >= 1 for v in pr.k), "probe.k", pr.k, "must be a non-empty list of integers >= 1"),
        (pr.temperature > 0, "probe.temperature", pr.temperature, "must be > 0"),
        (fs.ways >= 2, "fewshot.ways", fs.ways, "must be >= 2"),
        (fs.shots >= 1, "fewshot.shots", fs.shots, "must be >= 1"),
        (fs.queries >= 1, "fewshot.queries", fs.queries, "must be >= 1"),
        (fs.episodes >= 1, "fewshot.episodes", fs.episodes, "must be >= 1"),
        (fs.finetune_episodes >= 0, "fewshot.finetune_episodes", fs.finetune_episodes, "must be >= 0"),
        (not cfg.uses.members or len(cfg.ensemble.members) >= 2, "ensemble.members", cfg.ensemble.members, "must list at least 2 runs"),
    ]


def _surgery_checks(cfg: ExperimentConfig) -> Iterable[Check]:
    """Truncation, ``keep_head``, the conv head, unfreezing schedules and ``lr_ratio``."""
    t, h, s, r = cfg.model.truncate, cfg.head, cfg.strategy, cfg.train.lr_ratio
    if t is not None:
        given = {k: v for k, v in (("stages", t.stages), ("after", t.after)) if v is not None}
        yield (len(given) == 1, "model.truncate", given, "needs exactly one of stages / after")
        yield (t.stages is None or t.stages >= 1, "model.truncate.stages", t.stages, "must be >= 1 (the stem and the first N stages)")
        yield (t.after is None or bool(t.after.strip()), "model.truncate.after", t.after, "must name a module")
    weights = cfg.model.weights
    needs_run = f"needs weights: run:<run dir or experiment> (weights is {weights!r})"
    yield (not cfg.model.keep_head or weights.startswith("run:"), "model.keep_head", True, needs_run)
    yield (h.conv_channels >= 1, "head.conv_channels", h.conv_channels, "must be >= 1")
    yield (h.kernel_size >= 1 and h.kernel_size % 2 == 1, "head.kernel_size", h.kernel_size, "must be odd and >= 1 ('same' padding)")
    yield (s.unfreeze is None or s.freeze_epochs is None, "strategy.freeze_epochs", s.freeze_epochs, "and strategy.unfreeze cannot both be set")
    yield (s.freeze_epochs is None or s.freeze_epochs >= 1, "strategy.freeze_epochs", s.freeze_epochs, "must be >= 1")
    if s.unfreeze is not None:
        at = s.unfreeze.at_epochs
        increasing = bool(at) and all(e >= 1 for e in at) and all(b > a for a, b in itertools.pairwise(at))
        yield (increasing, "strategy.unfreeze.at_epochs", at, "must be a non-empty, strictly increasing list of epochs >= 1")
        per = s.unfreeze.stages_per_step
        yield (per is None or per >= 1, "strategy.unfreeze.stages_per_step", per, "must be >= 1 (or null: all at once)")
    milestones, _ = unfreeze_milestones(s)
    key = "strategy.freeze_epochs" if s.freeze_epochs is not None else "strategy.unfreeze.at_epochs"
    for m in milestones:
        yield (m < cfg.train.epochs, key, m, f"never comes: train.epochs={cfg.train.epochs} (epochs count from 0)")
    everything = "trains everything already, so unfreeze / freeze_epochs would do nothing; use linear_probe, freeze_first or bn_only"
    yield (not milestones or s.name not in ("scratch", "finetune"), "strategy.name", s.name, everything)
    if isinstance(r, list):
        yield (bool(r) and all(v > 0 for v in r), "train.lr_ratio", r, "must be a non-empty list of multipliers > 0")
    elif isinstance(r, float):
        yield (r > 0, "train.lr_ratio", r, "must be > 0")


def _recipe_checks(cfg: ExperimentConfig) -> Iterable[Check]:
    """Mixup / CutMix, EMA, the loss and class weights, the sampler (``kind: train`` only)."""
    t, d = cfg.train, cfg.data
    mx, ema, w = t.mixup, t.ema, t.class_weights
    if mx is not None:
        for key in ("alpha", "cutmix_alpha"):
            v = getattr(mx, key)
            yield (v is None or v > 0, f"train.mixup.{key}", v, "must be > 0 (null: off)")
        yield (mx.alpha is not None or mx.cutmix_alpha is not None, "train.mixup", "{alpha: null, cutmix_alpha: null}",
               "mixes nothing: set alpha (mixup) and/or cutmix_alpha (CutMix)")
        yield (0 <= mx.prob <= 1, "train.mixup.prob", mx.prob, "must be in [0, 1]")
        yield (0 <= mx.switch_prob <= 1, "train.mixup.switch_prob", mx.switch_prob, "must be in [0, 1]")
        yield (0 <= mx.label_smoothing < 1, "train.mixup.label_smoothing", mx.label_smoothing, "must be in [0, 1)")
        yield (t.label_smoothing == 0, "train.label_smoothing", t.label_smoothing,
               "does not apply with train.mixup (its soft targets are smoothed by train.mixup.label_smoothing)")
    if ema is not None:
        yield (0 < ema.decay < 1, "train.ema.decay", ema.decay, "must be in (0, 1)")
    if (la := t.lookahead) is not None:
        yield (la.k >= 1, "train.lookahead.k", la.k, "must be >= 1")
        yield (0 < la.alpha <= 1, "train.lookahead.alpha", la.alpha, "must be in (0, 1]")
    if (pr := t.progressive_resize) is not None:
        yield (0 < pr.start < 1, "train.progressive_resize.start", pr.start, "must be in (0, 1): the first epoch's side over the data's")
        yield (0 < pr.fraction <= 1, "train.progressive_resize.fraction", pr.fraction, "must be in (0, 1]")
    es = t.early_stopping
    yield (es.keep == "best" or es.patience is None, "train.early_stopping.patience", es.patience,
           "does not apply with train.early_stopping.keep: last (every epoch runs, the last is tested)")
    yield (t.focal_gamma >= 0, "train.focal_gamma", t.focal_gamma, "must be >= 0")
    if isinstance(w, list):
        yield (bool(w) and all(v > 0 for v in w), "train.class_weights", w, "must be 'balanced' or a non-empty list of weights > 0")
        n = len(d.classes) if d.classes is not None else None
        yield (n is None or len(w) == n, "train.class_weights", w, f"has {len(w)} weights, data.classes lists {n} classes")
    if not cfg.uses.training:
        used = {"train.mixup": mx, "train.ema": ema, "train.class_weights": w, "train.lookahead": t.lookahead,
                "train.progressive_resize": t.progressive_resize}
        used |= {"train.loss": t.loss} if t.loss != ("bce" if cfg.multilabel else "cross_entropy") else {}  # the task's default
        used |= {"data.sampler": d.sampler} if d.sampler != "random" else {}
        for key, value in used.items():
            yield (value is None, key, value, f"applies to kind: train only (this experiment is kind: {cfg.kind})")


def _lr_find_checks(cfg: ExperimentConfig) -> Iterable[Check]:
    """``train.lr: find`` / ``train.lr_find`` and ``train.calibrate`` (the rule name is checked by ``transferlab.engine.lr_find``)."""
    t, f = cfg.train, cfg.train.lr_find
    yield (f.start > 0, "train.lr_find.start", f.start, "must be > 0")
    yield (f.end > f.start, "train.lr_find.end", f.end, f"must be > train.lr_find.start ({f.start:g})")
    yield (f.steps >= 10, "train.lr_find.steps", f.steps, "must be >= 10")
    yield (f.diverge > 1, "train.lr_find.diverge", f.diverge, "must be > 1")
    yield (f.found is None or t.lr == f.found, "train.lr_find.found", f.found, "is recorded by a run with train.lr: find, not set by hand")
    if not cfg.uses.training:
        why = f"applies to kind: train only (this experiment is kind: {cfg.kind}); give a number"
        yield (t.lr != "find", "train.lr", t.lr, why)
        yield (t.calibrate == "none", "train.calibrate", t.calibrate, f"applies to kind: train only (this experiment is kind: {cfg.kind})")


def _finetuning_checks(cfg: ExperimentConfig) -> Iterable[Check]:
    """Layer decay, L2-SP, SWA, distillation, LP-FT and soups (their run references are checked by ``transferlab.kinds``)."""
    t, s = cfg.train, cfg.strategy
    yield (t.layer_decay is None or 0 < t.layer_decay <= 1, "train.layer_decay", t.layer_decay, "must be in (0, 1]")
    if t.l2_sp is not None:
        yield (t.l2_sp.alpha >= 0, "train.l2_sp.alpha", t.l2_sp.alpha, "must be >= 0")
        yield (t.l2_sp.beta >= 0, "train.l2_sp.beta", t.l2_sp.beta, "must be >= 0")
        yield (cfg.model.weights != "scratch", "model.weights", cfg.model.weights,
               "leaves train.l2_sp nothing to stay close to (a scratch start); use pretrained or run: weights, or drop l2_sp")
    if t.swa is not None:
        yield (0 < t.swa.start < 1, "train.swa.start", t.swa.start, "must be in (0, 1) (a fraction of train.epochs)")
        yield (t.swa.lr is None or t.swa.lr > 0, "train.swa.lr", t.swa.lr, "must be > 0 (or null: half of train.lr)")
        yield (t.swa.anneal_epochs >= 0, "train.swa.anneal_epochs", t.swa.anneal_epochs, "must be >= 0")
    if t.distill is not None:
        yield (t.distill.teacher.startswith("run:"), "train.distill.teacher", t.distill.teacher, "must be run:<experiment or run directory>")
        yield (0 <= t.distill.alpha <= 1, "train.distill.alpha", t.distill.alpha, "must be in [0, 1]")
        yield (t.distill.temperature > 0, "train.distill.temperature", t.distill.temperature, "must be > 0")
    if s.probe_epochs is not None or s.name == "lp_ft":
        yield (s.name == "lp_ft", "strategy.probe_epochs", s.probe_epochs, f"applies to strategy lp_ft only (strategy is {s.name!r})")
        yield (s.probe_epochs is not None and s.probe_epochs >= 1, "strategy.probe_epochs", s.probe_epochs, "must be >= 1 (lp_ft needs it)")
        yield (s.probe_epochs is None or s.probe_epochs < t.epochs, "strategy.probe_epochs", s.probe_epochs,
               f"must be < train.epochs ({t.epochs}): the fine-tuning phase gets the epochs after the probe")
    if not cfg.uses.training:
        used = {"train.layer_decay": t.layer_decay, "train.l2_sp": t.l2_sp, "train.swa": t.swa, "train.distill": t.distill}
        for key, value in used.items():
            yield (value is None, key, value, f"applies to kind: train only (this experiment is kind: {cfg.kind})")
    sp = cfg.soup
    if sp.interpolate is not None:
        a = sp.interpolate.alphas
        yield (sp.interpolate.base.startswith("run:"), "soup.interpolate.base", sp.interpolate.base, "must be run:<experiment or run directory>")
        yield (bool(a) and all(0 <= v <= 1 for v in a), "soup.interpolate.alphas", a, "must be a non-empty list of numbers in [0, 1]")


def resolve_as_recorded(recorded: dict[str, Any], requested: dict[str, Any]) -> dict[str, Any]:
    """``requested`` (a config snapshot) with what a run resolved at run time filled in from its ``recorded`` config.

    ``train.lr: find`` is resolved by the run: its ``config.yaml`` records the lr found as ``train.lr`` and
    ``train.lr_find.found``. Asking for ``find`` again with the same finder settings matches that record,
    so ``--resume`` reuses (or continues) the run instead of calling the found number a change.
    """
    found = ((recorded.get("train") or {}).get("lr_find") or {}).get("found")
    train = requested.get("train") or {}
    if train.get("lr") != "find" or found is None:
        return requested
    lr_find = {**(train.get("lr_find") or {}), "found": found}
    return {**requested, "train": {**train, "lr": recorded["train"].get("lr"), "lr_find": lr_find}}


def _inspect_checks(cfg: ExperimentConfig) -> Iterable[Check]:
    """``predict:`` and ``activations:`` (the files themselves are checked by ``transferlab.tools.inspect``)."""
    p, a = cfg.predict, cfg.activations
    yield (p.top_k >= 1, "predict.top_k", p.top_k, "must be >= 1")
    yield (a.max_maps >= 1, "activations.max_maps", a.max_maps, "must be >= 1")
    yield (bool(a.gradcam_layer.strip()), "activations.gradcam_layer", a.gradcam_layer, "must name a layer (or 'features')")
    for key, values in (("predict.images", p.images), ("activations.images", a.images), ("activations.layers", a.layers or [])):
        for i, v in enumerate(values):
            yield (bool(v.strip()), f"{key}[{i}]", v, "must not be empty")
    yield (a.layers is None or bool(a.layers), "activations.layers", a.layers, "must list at least one layer (or be null: the defaults)")
    if not cfg.uses.training:
        for key, values in (("predict.images", p.images), ("activations.images", a.images)):
            yield (not values, key, values, f"applies to kind: train only (this experiment is kind: {cfg.kind})")


def _run_name(value: str) -> str:
    return value[len("run:"):] if value.startswith("run:") else value


def run_references(cfg: ExperimentConfig) -> dict[str, str]:
    """Every key of ``cfg`` that names another run, dotted (``soup.members[1]``) -> the run it names (``run:`` removed):
    ``model.weights: run:…``, ``train.distill.teacher``, ``soup.members``, ``soup.interpolate.base``. A study runs
    those first (``transferlab.study.plan_study``) and replaces each name by its run directory (``with_run_references``)."""
    refs = {"model.weights": _run_name(cfg.model.weights)} if cfg.model.weights.startswith("run:") else {}
    if cfg.train.distill is not None:
        refs["train.distill.teacher"] = _run_name(cfg.train.distill.teacher)
    refs.update({f"soup.members[{i}]": _run_name(m) for i, m in enumerate(cfg.soup.members)})
    if cfg.soup.interpolate is not None:
        refs["soup.interpolate.base"] = _run_name(cfg.soup.interpolate.base)
    return refs


def with_run_references(cfg: ExperimentConfig, resolved: dict[str, str]) -> ExperimentConfig:
    """``cfg`` with the run references named in ``resolved`` (keys of ``run_references``) replaced by those runs
    (``run:<dir>``; soup members as plain directories, like ensemble members)."""
    if not resolved:
        return cfg
    model, train, soup = cfg.model, cfg.train, cfg.soup
    if "model.weights" in resolved:
        model = dataclasses.replace(model, weights=f"run:{resolved['model.weights']}")
    if "train.distill.teacher" in resolved and train.distill is not None:
        train = dataclasses.replace(train, distill=dataclasses.replace(train.distill, teacher=f"run:{resolved['train.distill.teacher']}"))
    members = [resolved.get(f"soup.members[{i}]", m) for i, m in enumerate(soup.members)]
    interpolate = soup.interpolate
    if "soup.interpolate.base" in resolved and interpolate is not None:
        interpolate = dataclasses.replace(interpolate, base=f"run:{resolved['soup.interpolate.base']}")
    soup = dataclasses.replace(soup, members=members, interpolate=interpolate)
    return dataclasses.replace(cfg, model=model, train=train, soup=soup)


def resolve_paths(cfg: ExperimentConfig, base: str | Path) -> ExperimentConfig:
    """``cfg`` with the relative paths of ``PATH_KEYS`` (``predict.images``, ``activations.images``) joined to ``base``.

    A study file names its outside images relative to its own folder, so a gallery study runs from any
    working directory; ``parse_study`` calls this with the study file's folder before validating.
    The result is absolute, so the run's checks and ``config.yaml`` do not depend on the working folder; absolute
    and ``~`` paths are kept (``~`` expanded). Changes ``cfg`` in place and returns it.
    """
    base = Path(base).absolute()
    for section, name in PATH_KEYS:
        sec = getattr(cfg, section)
        paths = [Path(p).expanduser() for p in getattr(sec, name)]
        setattr(sec, name, [str(p if p.is_absolute() else base / p) for p in paths])
    return cfg
