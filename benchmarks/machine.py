"""The machine a benchmark ran on, for its JSON and the line printed with its table: CPU model (with its family
and model numbers: "AMD EPYC" alone names several generations), the instruction-set flags that change kernel
choice (AVX2, FMA, AVX-512*, AMX*), core count, the kernel's transparent-huge-page mode (it decides what
jtranspeft's host allocator setting does, `jtranspeft.utils.host_memory`), accelerator and the versions of the
libraries that compute."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jtranspeft.utils.host_memory import transparent_huge_pages  # noqa: E402  (no JAX)

FLAG_PREFIXES = ("avx2", "fma", "avx512", "amx")
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "torch", "peft", "transformers", "llama_cpp_python")


def cpu_info() -> dict:
    """{"model", "family", "model_number", "flags"}: from /proc/cpuinfo where it exists (Linux), else the
    platform's processor name (family and model number None)."""
    model, flags, numbers = platform.processor() or platform.machine(), [], {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("cpu family", "model") and key not in numbers:
                    numbers[key] = int(value) if value.strip().isdigit() else None
                elif key == "flags" and not flags:
                    flags = sorted(f for f in value.split() if f.startswith(FLAG_PREFIXES))
    except OSError:
        pass
    return {"model": model, "family": numbers.get("cpu family"), "model_number": numbers.get("model"), "flags": flags}


def machine_info() -> dict:
    """The machine record stored in every benchmark's JSON."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            continue
    accelerator = None
    try:
        import jax

        device = jax.devices()[0]
        accelerator = None if device.platform == "cpu" else device.device_kind
    except Exception:  # noqa: BLE001  (no JAX backend: a CPU-only record)
        pass
    return {**cpu_info(), "cores": os.cpu_count(), "transparent_hugepage": transparent_huge_pages(),
            "accelerator": accelerator, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


def machine_line(info: dict) -> str:
    """One line naming the machine, for printing above a table."""
    flags = ", ".join(info["flags"]) or "no AVX2/AVX-512/AMX"
    family = f" family {info['family']} model {info['model_number']}" if info.get("family") is not None else ""
    where = info["accelerator"] or f"{info['cores']} cores"
    pages = f", huge pages {info['transparent_hugepage']}" if info.get("transparent_hugepage") else ""
    libs = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return f"machine: {info['model']}{family} ({flags}), {where}{pages}; {libs}"
