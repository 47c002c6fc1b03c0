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
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

__all__ = ["AUTO", "NATIVE_BF16_FLAGS", "auto_precision", "autocast_for", "cpu_flags", "cpu_has_native_bf16", "device_type",
           "resolve_precision"]

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
