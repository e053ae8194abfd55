"""The machine a benchmark ran on, for its JSON and the line printed with its table: CPU model, the
instruction-set flags that change kernel choice (AVX2, FMA, AVX-512*, AMX*), core count, accelerator and the
versions of the libraries that compute."""

from __future__ import annotations

import os
import platform
from importlib import metadata

FLAG_PREFIXES = ("avx2", "fma", "avx512", "amx")
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "torch", "peft", "transformers", "llama_cpp_python")


def cpu_info() -> dict:
    """{"model", "flags"}: from /proc/cpuinfo where it exists (Linux), else the platform's processor name."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = sorted(f for f in value.split() if f.startswith(FLAG_PREFIXES))
    except OSError:
        pass
    return {"model": model, "flags": flags}


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
    return {**cpu_info(), "cores": os.cpu_count(), "accelerator": accelerator, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


def machine_line(info: dict) -> str:
    """One line naming the machine, for printing above a table."""
    flags = ", ".join(info["flags"]) or "no AVX2/AVX-512/AMX"
    where = info["accelerator"] or f"{info['cores']} cores"
    libs = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return f"machine: {info['model']} ({flags}), {where}; {libs}"
