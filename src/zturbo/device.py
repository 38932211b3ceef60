"""Device resolution, capability probe and memory stats."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DeviceError

GIB = 2**30
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Capabilities:
    """What the device can compute; `name` is human readable."""

    device: str
    name: str
    compute_capability: tuple[int, int] | None
    bf16: bool
    fp16: bool
    fp8: bool
    flash_attention: bool


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            # Indexed: some CUDA calls (set_per_process_memory_fraction) refuse a bare "cuda".
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"device {spec!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} requested but CUDA is not available here; use --device cpu")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", index)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {spec!r} requested but MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {spec!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def probe(device: torch.device) -> Capabilities:
    if device.type == "cuda":
        cc = torch.cuda.get_device_capability(device)
        return Capabilities(
            device=str(device),
            name=torch.cuda.get_device_name(device),
            compute_capability=cc,
            bf16=torch.cuda.is_bf16_supported(),
            fp16=True,
            fp8=cc >= (8, 9),
            flash_attention=torch.backends.cuda.is_flash_attention_available() and cc >= (8, 0),
        )
    if device.type == "mps":
        return Capabilities(str(device), "Apple MPS", None, bf16=True, fp16=True, fp8=False, flash_attention=False)
    return Capabilities(str(device), "CPU", None, bf16=True, fp16=True, fp8=False, flash_attention=False)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def memory_line(device: torch.device) -> str:
    """One line: accelerator name with total / allocated / free memory."""
    gib = GIB
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        name = torch.cuda.get_device_name(device)
        return f"{name}: total {total / gib:.1f} GiB, allocated {allocated / gib:.1f} GiB, free {free / gib:.1f} GiB"
    if device.type == "mps":
        allocated = torch.mps.current_allocated_memory()
        return f"Apple MPS: allocated {allocated / gib:.1f} GiB"
    return f"CPU: {_host_memory_text()}"


def _host_memory_text() -> str:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        total = int(info["MemTotal"].split()[0]) / 2**20
        free = int(info["MemAvailable"].split()[0]) / 2**20
        return f"total {total:.1f} GiB, available {free:.1f} GiB"
    except (OSError, KeyError, ValueError):
        return "memory unknown"


def apply_vram_budget(device: torch.device, gib: float | None) -> None:
    """Cap this process's share of a CUDA device at `gib` GiB (--vram-budget): allocations beyond
    it then fail as they would on a smaller GPU. Nothing is set off CUDA or without a budget.

    This is the one place zturbo changes the process's memory fraction, and only when asked.
    """
    if device.type != "cuda" or gib is None:
        return
    total = torch.cuda.mem_get_info(device)[1]
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)


def memory_budget(device: torch.device, gib: float | None) -> int | None:
    """Bytes the memory planner plans for: `gib` when given, else what is free on a CUDA device;
    None otherwise (the weights then live in the host's memory, which is not planned)."""
    if gib is not None:
        return int(gib * GIB)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def budget_fraction(device: torch.device) -> float:
    """The per-process memory fraction --vram-budget set (1.0 when none, or on older torch)."""
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # newer torch only
    if get_fraction is None:
        return 1.0
    return get_fraction(device.index if device.index is not None else torch.cuda.current_device())


def free_device_memory(device: torch.device) -> int:
    """Bytes this process could still allocate on a CUDA device: free memory plus its own unused
    cache, within the --vram-budget cap (mem_get_info reports the card's free memory whatever the
    process's share; the cap is read back, `budget_fraction`)."""
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    return capped_room(free, total, budget_fraction(device), reserved, allocated)


def memory_room(device: torch.device, budget: int | None) -> int | None:
    """Bytes this process could still allocate on `device` within its budget; None where that is
    the host's memory, which is not planned (the CPU; MPS without a `budget` in bytes).

    CUDA: `free_device_memory`, whose cap `apply_vram_budget` set from `budget`. MPS has no cap:
    `budget` less what its tensors hold.
    """
    if device.type == "cuda":
        return free_device_memory(device)
    if device.type == "mps" and budget is not None:
        return max(0, budget - torch.mps.current_allocated_memory())
    return None


def capped_room(free: int, total: int, fraction: float, reserved: int, allocated: int) -> int:
    """Bytes a CUDA process may still allocate: new blocks up to the card's `free` memory and up to
    its cap (`fraction` of `total`, which counts the blocks it has reserved), plus its own reserved
    but unused cache."""
    new_blocks = min(free, int(total * fraction) - reserved)
    return max(0, new_blocks) + reserved - allocated


def release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_available(device: torch.device) -> str:
    """'the device has N GiB', or the budget when --vram-budget capped the process below that."""
    if device.type != "cuda":
        return f"the {device.type} device's memory is the host's"
    total = torch.cuda.mem_get_info(device)[1]
    fraction = budget_fraction(device)
    if fraction < 1.0:
        return f"the budget (--vram-budget) is {total * fraction / GIB:.1f} GiB"
    return f"the device has {total / GIB:.1f} GiB"
