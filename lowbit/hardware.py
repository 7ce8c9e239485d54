"""Where calibration runs and in which precision: the device, and the dtype of the calibration forward passes."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from lowbit.errors import LowbitError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LowbitError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError(f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu.")
    return dev


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), where bf16 matmuls beat float32 ones."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The dtype of calibration forward passes. `auto`: bfloat16 where the hardware is fast at it (a CUDA GPU with
    bf16, a CPU with AVX512-BF16/AMX), else float32. Statistics (Hessians) and the quantization itself stay in
    float32, and weights are always quantized from their original values."""
    if requested != "auto":
        if requested not in COMPUTE_DTYPES:
            raise LowbitError(f"unknown --compute-dtype {requested!r}: use auto, {', '.join(COMPUTE_DTYPES)}.")
        return COMPUTE_DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def peak_memory(device: torch.device) -> dict:
    """This process's peak resident host memory and, on a GPU, its peak allocated device memory, in bytes."""
    import resource

    out = {"peak_host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_freed_memory() -> None:
    """Give the system the free pages inside glibc's heaps (malloc_trim), which a block's many small tensors leave
    behind in amounts that vary from run to run. A no-op elsewhere."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once (allocations of 8 MiB and more are mapped on
    their own, and the threshold no longer grows with use). Without it, the blocks a long streamed run reads and
    drops one after the other stay in the process's resident memory in varying amounts. A no-op elsewhere."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD
        mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD


@dataclasses.dataclass(frozen=True)
class MeasuredRun:
    returncode: int
    peak_rss_bytes: int  # the command's own peak resident memory
    seconds: float
    stdout: str
    stderr: str


_WATCHER = ("import json, resource, subprocess, sys, time; argv = json.loads(sys.argv[1]); t = time.perf_counter(); "
            "r = subprocess.run(argv, capture_output=True, text=True); s = time.perf_counter() - t; "
            "sys.stderr.write(r.stderr); sys.stdout.write(r.stdout); "
            "print('\\n#lowbit-watch', r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, s)")


def run_measured(argv: list[str], **kwargs) -> MeasuredRun:
    """Run a command and measure its peak resident memory: it runs as the only child of a small watcher process,
    whose RUSAGE_CHILDREN maximum is then that command's alone (a child forked from a large process, such as a test
    runner holding a model, would count its parent's pages). `kwargs` go to subprocess.run (env, cwd)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _WATCHER, json.dumps(argv)], capture_output=True, text=True,
                         check=False, **kwargs)
    body, _, tail = out.stdout.rpartition("\n#lowbit-watch ")
    if not tail:
        raise RuntimeError(f"the watcher of {argv[:4]} failed: {out.stderr[-2000:]}")
    code, kb, seconds = tail.split()
    return MeasuredRun(int(code), int(kb) * 1024, float(seconds), body, out.stderr)
