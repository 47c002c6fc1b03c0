"""``train.precision: auto``: bf16 autocast where the hardware computes bfloat16 natively, fp32 elsewhere.

``auto`` is resolved once per run, before its ``config.yaml`` is written (``kinds.base.resolve_run_config``),
so a run directory always records the concrete precision it used and ``--resume`` keeps it.

* **CPU**: ``bf16-mixed`` when the CPU has *native* bfloat16 instructions — AVX512-BF16 (``avx512_bf16``:
  ``vdpbf16ps``) or AMX (``amx_bf16``: tile matrix multiply) — else ``32-true``. Detected from the flags the
  kernel reports in ``/proc/cpuinfo`` (exact and cheap to test with mocked flags); where there is no
  ``/proc/cpuinfo`` (macOS, Windows) from torch's own cpuinfo probes (``torch.cpu._is_avx512_bf16_supported``,
  ``_is_amx_tile_supported``) when this torch has them. Not from ``torch.backends.cpu.get_cpu_capability()``
  (it says ``AVX512`` with or without BF16) nor from oneDNN's ``_is_mkldnn_bf16_supported`` (true on any
  AVX-512 CPU, where bf16 is *emulated* and slower than fp32): both would be guesses.
* **CUDA**: ``bf16-mixed`` when ``torch.cuda.is_bf16_supported()`` (Ampere and newer), else ``32-true``.
* Anything else (MPS, …): ``32-true``.

Results depend on the precision (bf16 rounds activations to 8 bits of mantissa), which is why it is
recorded with every run and shown in the comparison table.

**A guard for a oneDNN bf16 bug** (``guard_bf16_convs``): on the CPU (torch 2.14.1), the bf16 weight gradient of
a strided k×k convolution whose input is 1×1 pixel (a 3×3 stride-2 conv at the end of a ResNet fed 16 px images)
comes back as uninitialised memory — NaN or values like 1e36 in some of the taps that only see padding, in
about one step of three (``tests/test_precision.py`` reproduces it on a bare ``nn.Conv2d``). Such layers are
found with one shape-only forward and run in fp32 (their class becomes ``Fp32Conv2d``: the weights, their names
and the checkpoints are unchanged); mathematically they are a matrix product of the centre tap, so fp32 costs
nothing measurable.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

__all__ = ["AUTO", "NATIVE_BF16_FLAGS", "Fp32Conv2d", "auto_precision", "autocast_for", "bf16_unsafe_convs", "cpu_flags",
           "cpu_has_native_bf16", "device_type", "guard_bf16_convs", "resolve_precision"]

AUTO = "auto"
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""``/proc/cpuinfo`` flags of x86 CPUs that compute bfloat16 natively (AVX512-BF16, AMX-BF16)."""


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU feature flags the kernel reports (first ``flags`` line), or ``None`` where there is no such file."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86: flags; arm64: Features
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when this CPU computes bfloat16 natively (``flags``: as ``cpu_flags`` returns them; read when omitted)."""
    if flags is None:
        flags = cpu_flags()
    if flags is not None:
        return bool(flags & NATIVE_BF16_FLAGS)
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if callable(p))


def device_type(accelerator: str) -> str:
    """The device type Lightning Fabric picks for ``train.accelerator`` (``auto``: CUDA, then MPS, then CPU)."""
    if accelerator in ("cuda", "gpu"):
        return "cuda"
    if accelerator == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    return accelerator


def auto_precision(device: str, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(precision, why) that ``auto`` means on a device type (``cpu``, ``cuda``, …)."""
    if device == "cpu":
        if cpu_has_native_bf16(flags):
            return "bf16-mixed", "the CPU has native bf16 (AVX512-BF16 / AMX)"
        return "32-true", "the CPU has no native bf16 (AVX512-BF16 / AMX), where bf16 is emulated and slower"
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "the CUDA device supports bf16"
        return "32-true", "the CUDA device has no bf16 support"
    return "32-true", f"no bf16 autocast choice for device type {device!r}"


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """``precision`` itself, or for ``auto`` the concrete Lightning precision on the device ``accelerator`` picks."""
    if precision != AUTO:
        return precision
    return auto_precision(device_type(accelerator))[0]


def autocast_for(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager[None]:
    """The autocast a run of ``precision`` evaluated under (``bf16-mixed``, ``16-mixed``), for inference outside Fabric
    (``transferlab predict``), so a run's predictions come out as the run computed them; a no-op for full precision."""
    kind = torch.device(device).type
    if precision.startswith("bf16") and "mixed" in precision:
        return torch.autocast(kind, dtype=torch.bfloat16)
    if precision.startswith("16") and "mixed" in precision and kind == "cuda":
        return torch.autocast(kind, dtype=torch.float16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------
# The oneDNN bf16 weight-gradient bug: strided convolutions on 1×1 inputs run in fp32


class Fp32Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that computes in fp32 whatever the autocast or the input dtype (output in the input's dtype
    outside autocast, so a ``bf16-true`` network stays bf16 around it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        with torch.autocast(kind, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            out = self._conv_forward(x.float(), self.weight.float(), bias)
        return out if torch.is_autocast_enabled(kind) else out.to(x.dtype)


def bf16_unsafe_convs(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the ``nn.Conv2d`` layers of ``model`` that receive a 1×1 input with a stride above 1 and a kernel
    above 1×1 when ``model`` runs on ``x`` (one image of it is enough: a shape-only forward in eval mode under
    ``no_grad``, so no statistics, gradients or random numbers change)."""
    found: list[str] = []

    def hook(name: str):  # noqa: ANN202
        def record(mod: nn.Conv2d, args: tuple[torch.Tensor, ...]) -> None:
            h, w = args[0].shape[-2:]
            if h == w == 1 and max(mod.stride) > 1 and max(mod.kernel_size) > 1 and name not in found:
                found.append(name)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def guard_bf16_convs(model: nn.Module, x: torch.Tensor, precision: str, device: str | torch.device) -> list[str]:
    """Under bf16 on the CPU, make the layers ``bf16_unsafe_convs`` finds compute in fp32 (see the module docstring);
    returns their names (empty for other precisions and devices)."""
    if not precision.startswith("bf16") or torch.device(device).type != "cpu":
        return []
    names = bf16_unsafe_convs(model, x)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].__class__ = Fp32Conv2d
    return names
