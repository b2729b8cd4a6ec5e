"""Accelerators, memory sizes and the verdict: does an estimated peak fit on a device?

The table lists common accelerators with the memory of *one PyTorch device* the estimate checks
against: what ``torch.cuda.get_device_properties(i).total_memory`` reports on that accelerator
(as published from real machines by torch or CUDA's ``deviceQuery``, which read the same
``cudaDeviceProp.totalGlobalMem``; drivers differ by a few tens of MiB), never the datasheet's round
figure: the driver keeps part of the memory for itself (nvidia-smi's total counts it), ECC takes
its share on GDDR cards, and an MI250X is two dies (GCDs), each its own PyTorch device. Each
entry's ``source`` gives that figure's origin and the datasheet's. On a machine with CUDA the
device's own ``torch.cuda.get_device_properties(i).total_memory`` is used instead.

What PyTorch's allocator never counts (the CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers,
other processes) is left free: :data:`DEFAULT_RESERVE` (settable per call) is subtracted from the
capacity before comparing; with ``memory=`` given and no ``reserve=``, the reserve is
:func:`default_reserve` of that memory (at most an eighth of it). The caching allocator's
fragmentation comes on top and is not modelled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torchmagic.core.errors import TorchMagicError

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
DEFAULT_RESERVE = 1 * GiB
RESERVE_SOURCE = ("left for what PyTorch's allocator does not count: the CUDA context "
                  "(~0.3-0.6 GiB), cuBLAS/cuDNN workspaces, NCCL buffers")
RESERVE_FRACTION = 8      # memory= without reserve=: the reserve is at most memory / 8
SCALED_RESERVE_SOURCE = ("default for a given memory: the smaller of 1 GiB and an eighth of it "
                         "(1 GiB is for a large GPU's CUDA context and workspaces); set it with "
                         "--reserve (reserve=)")


def default_reserve(memory: int | None = None) -> int:
    """The reserve (bytes) when none is given: :data:`DEFAULT_RESERVE` (1 GiB) for a device; for a
    ``memory=`` of ``memory`` bytes, the smaller of 1 GiB and ``memory // 8``, so a small budget
    (``memory="1GiB"``) keeps 7/8 of itself usable instead of nothing."""
    if memory is None:
        return DEFAULT_RESERVE
    return min(DEFAULT_RESERVE, memory // RESERVE_FRACTION)


@dataclass(frozen=True)
class Accelerator:
    """One accelerator of the table: ``memory`` bytes, from ``source``."""

    name: str
    aliases: tuple[str, ...]
    memory: int
    source: str


_TORCH = "torch.cuda.get_device_properties().total_memory"

ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("NVIDIA H200", ("h200", "h200-141gb", "h200-sxm", "h200-nvl"), 143156 * MiB,
                f"{_TORCH}: 143,156 MiB (datasheet: 141 GB HBM3e; nvidia-smi: 143,771 MiB)"),
    Accelerator("NVIDIA H100 80GB", ("h100", "h100-80gb", "h100-sxm", "h100-pcie"), 81089 * MiB,
                f"{_TORCH}: 81,089 MiB on an H100 80GB HBM3 (datasheet: 80 GB; nvidia-smi: "
                "81,559 MiB)"),
    Accelerator("NVIDIA A100 80GB", ("a100-80gb", "a100-80"), 81049 * MiB,
                f"{_TORCH}: 81,049 MiB (datasheet: 80 GB HBM2e; nvidia-smi: 81,920 MiB)"),
    Accelerator("NVIDIA A100 40GB", ("a100", "a100-40gb", "a100-40"), 40339 * MiB,
                f"{_TORCH}: 40,339 MiB (datasheet: 40 GB HBM2; nvidia-smi: 40,960 MiB)"),
    Accelerator("NVIDIA L40S", ("l40s", "l40s-48gb"), 45589 * MiB,
                f"{_TORCH}: 45,589 MiB (datasheet: 48 GB GDDR6 with ECC, on)"),
    Accelerator("NVIDIA V100 32GB", ("v100-32gb", "v100-32"), 32494 * MiB,
                f"{_TORCH}: 32,494 MiB (datasheet: 32 GB HBM2)"),
    Accelerator("NVIDIA V100 16GB", ("v100", "v100-16gb", "v100-16"), 16144 * MiB,
                f"{_TORCH}: 16,144 MiB (datasheet: 16 GB HBM2)"),
    Accelerator("NVIDIA RTX 4090", ("rtx4090", "rtx-4090", "4090"), 24563 * MiB,
                f"{_TORCH}: 24,563 MiB (GeForce RTX 4090 specifications: 24 GB GDDR6X)"),
    Accelerator("NVIDIA RTX 3090", ("rtx3090", "rtx-3090", "3090"), 24238 * MiB,
                f"{_TORCH}: 24,238 MiB (GeForce RTX 3090 specifications: 24 GB GDDR6X)"),
    Accelerator("NVIDIA L4", ("l4", "l4-24gb"), 22518 * MiB,
                f"{_TORCH}: 22,518 MiB (datasheet: 24 GB GDDR6; nvidia-smi: 23,034 MiB)"),
    Accelerator("NVIDIA A10G", ("a10g", "a10"), 22587 * MiB,
                f"{_TORCH}: 22,587 MiB on an A10G (A10 datasheet: 24 GB GDDR6)"),
    Accelerator("NVIDIA T4", ("t4", "t4-16gb"), 15102 * MiB,
                f"{_TORCH}: 15,102 MiB with ECC on (datasheet: 16 GB GDDR6; nvidia-smi: "
                "15,360 MiB)"),
    Accelerator("AMD MI300X", ("mi300x", "mi300"), 196592 * MiB,
                f"{_TORCH} (ROCm): 196,592 MiB (Instinct MI300X datasheet: 192 GB HBM3)"),
    Accelerator("AMD MI250X (one GCD)", ("mi250x", "mi250"), 65520 * MiB,
                f"{_TORCH} (ROCm): 65,520 MiB per device: PyTorch sees each of the two dies "
                "(GCDs) as one device (Instinct MI250X datasheet: 128 GB HBM2e, two dies of "
                "64 GB)"),
)


def _key(text: str) -> str:
    return re.sub(r"[\s_]+", "-", text.strip().lower()).removeprefix("nvidia-").removeprefix(
        "amd-").removeprefix("geforce-")


def find_accelerator(name: str) -> Accelerator | None:
    """The table entry for ``name`` (``"H100"``, ``"a100-40gb"``, ``"RTX 4090"``...), or None."""
    key = _key(name)
    compact = key.replace("-", "")
    for acc in ACCELERATORS:
        keys = {_key(acc.name), *acc.aliases}
        if key in keys or compact in {k.replace("-", "") for k in keys}:
            return acc
    return None


def accelerator_names() -> str:
    return ", ".join(acc.aliases[0] for acc in ACCELERATORS)


_UNITS = {"": 1, "b": 1, "k": KiB, "kb": 10**3, "kib": KiB, "m": MiB, "mb": 10**6, "mib": MiB,
          "g": GiB, "gb": 10**9, "gib": GiB, "t": TiB, "tb": 10**12, "tib": TiB}


def parse_bytes(value: Any, what: str = "memory") -> int:
    """``80GiB``, ``"24 GB"``, ``"512MiB"``, ``"1.5g"`` (k/m/g/t alone: binary) or a number of
    bytes -> bytes. GB/MB are decimal (10**9), GiB/MiB binary (2**30), as the standards say."""
    if isinstance(value, bool):
        raise TorchMagicError(f"{what} must be a size like 80GiB or 24GB; got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise TorchMagicError(f"{what} must not be negative; got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise TorchMagicError(f"{what} must be a size like 80GiB, 24GB, 512MiB or a number of bytes; "
                          f"got {value!r}")


@dataclass
class Capacity:
    """The memory a peak is checked against: ``total`` bytes of ``name`` (from ``source``),
    minus ``reserve`` bytes left for what PyTorch does not allocate itself."""

    name: str
    total: int
    source: str
    reserve: int = DEFAULT_RESERVE
    reserve_source: str = RESERVE_SOURCE
    gpu: bool = True            # a CUDA/ROCm accelerator (the step is traced as on one)

    @property
    def usable(self) -> int:
        return max(0, self.total - self.reserve)


@dataclass
class Verdict:
    """``fits``: peak <= usable; ``margin``: spare bytes when it fits, missing bytes when not."""

    capacity: Capacity
    peak: int
    fits: bool
    margin: int


def verdict(peak: int, capacity: Capacity) -> Verdict:
    fits = peak <= capacity.usable
    return Verdict(capacity, peak, fits, capacity.usable - peak if fits else peak - capacity.usable)


def cuda_capacity(index: int | None, reserve: int) -> Capacity:
    """The capacity of a CUDA device of this machine (its reported total memory)."""
    import torch

    if not torch.cuda.is_available():
        raise TorchMagicError("CUDA is not available here: name an accelerator instead (e.g. "
                              f"--device H100; known: {accelerator_names()}) or give --memory")
    if index is None:
        index = torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise TorchMagicError(f"cuda:{index}: only {torch.cuda.device_count()} CUDA device(s) here")
    props = torch.cuda.get_device_properties(index)
    return Capacity(name=f"cuda:{index} ({props.name})", total=int(props.total_memory),
                    source="torch.cuda.get_device_properties().total_memory", reserve=reserve)


def resolve_capacity(device: Any = None, memory: Any = None, reserve: Any = None
                     ) -> Capacity | None:
    """What to check against: ``memory`` (a size) wins, else ``device`` (``"cuda"``, ``"cuda:1"``,
    an accelerator name), else the current CUDA device when there is one, else None.

    ``reserve``: bytes left free (a size); None: :func:`default_reserve` (1 GiB; with ``memory``,
    the smaller of 1 GiB and an eighth of it). Raises :class:`TorchMagicError` when a given
    reserve leaves nothing of the memory."""
    res = DEFAULT_RESERVE if reserve is None else parse_bytes(reserve, "reserve")
    cap = _resolve(device, memory, res)
    if cap is None:
        return None
    if reserve is not None:
        cap.reserve_source = "as given"
        if res >= cap.total:
            given = _shown(reserve)
            what = (f"memory={_shown(memory)}" if memory is not None else
                    f"{cap.name}'s {cap.total / MiB:,.0f} MiB")
            raise TorchMagicError(
                f"reserve={given} leaves nothing of {what}: the reserve is taken from the memory "
                f"before the peak is compared; give a smaller reserve (e.g. reserve=0) or none "
                f"(default: 1 GiB, for a given memory the smaller of 1 GiB and an eighth of it)")
    elif memory is not None:
        cap.reserve = default_reserve(cap.total)
        cap.reserve_source = SCALED_RESERVE_SOURCE
    return cap


def _shown(value: Any) -> str:
    """A size as the user wrote it (``1GiB``), or its bytes."""
    return value.strip() if isinstance(value, str) else f"{int(value):,}"


def _resolve(device: Any, memory: Any, res: int) -> Capacity | None:
    import torch

    if memory is not None:
        total = parse_bytes(memory, "memory")
        if total <= 0:
            raise TorchMagicError(f"memory must be positive; got {memory!r}")
        label = memory if isinstance(memory, str) else f"{total:,} bytes"
        base = _resolve(device, None, res) if device is not None else None
        return Capacity(name=f"{label.strip()} of memory", total=total, source="as given",
                        reserve=res, gpu=base.gpu if base is not None else True)
    if device is None:
        if torch.cuda.is_available():
            return cuda_capacity(None, res)
        return None
    if isinstance(device, torch.device) or (isinstance(device, str) and re.fullmatch(
            r"\s*(cuda|cpu|meta|mps|xpu)(:\d+)?\s*", device.lower())):
        dev = torch.device(device)
        if dev.type == "cuda":
            return cuda_capacity(dev.index, res)
        raise TorchMagicError(f"device {str(device)!r} has no memory figure to check against: use "
                              "cuda, cuda:N, an accelerator name (e.g. H100; known: "
                              f"{accelerator_names()}) or give memory= (e.g. 64GiB)")
    if isinstance(device, str):
        acc = find_accelerator(device)
        if acc is None:
            raise TorchMagicError(f"unknown accelerator {device!r} (known: {accelerator_names()}; "
                                  "or give its memory, e.g. --memory 48GiB)")
        return Capacity(name=acc.name, total=acc.memory, source=acc.source, reserve=res)
    raise TorchMagicError(f"device must be cuda, cuda:N or an accelerator name; got "
                          f"{type(device).__name__}")


def fits_table(peak: int, reserve: int = DEFAULT_RESERVE) -> list[Verdict]:
    """The verdict on every accelerator of the table, largest memory first."""
    out = [verdict(peak, Capacity(acc.name, acc.memory, acc.source, reserve))
           for acc in ACCELERATORS]
    return sorted(out, key=lambda v: -v.capacity.total)


__all__ = ["ACCELERATORS", "DEFAULT_RESERVE", "RESERVE_FRACTION", "Accelerator", "Capacity",
           "Verdict", "accelerator_names", "cuda_capacity", "default_reserve", "find_accelerator",
           "fits_table", "parse_bytes", "resolve_capacity", "verdict"]
