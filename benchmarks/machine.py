"""The machine a benchmark ran on, for its JSON and the line printed with its table: CPU model (with its family
and model numbers: "AMD EPYC" alone names several generations), the instruction-set flags that change kernel
choice (AVX2, FMA, AVX-512*, AMX*), core count, the kernel's transparent-huge-page mode (it decides what
jtranspeft's host allocator setting does, `jtranspeft.utils.host_memory`), accelerator and the versions of the
libraries that compute. `isa_env("avx2")` runs a benchmark's workers with AVX-512 hidden (CPUID masked,
`isa_mask.c`), so an AVX-512 machine picks the kernels an AVX2-only one would; the record then says so."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jtranspeft.checkpoints.assets import cache_root  # noqa: E402  (no JAX)
from jtranspeft.utils.host_memory import transparent_huge_pages  # noqa: E402

ISA_CHOICES = ("native", "avx2")
ISA_ENV = "JTRANSPEFT_BENCH_ISA"  # set by isa_env: a re-executed process knows the mask is loaded (profile_train_step)
MASK_SOURCE = Path(__file__).with_name("isa_mask.c")

FLAG_PREFIXES = ("avx2", "fma", "avx512", "amx")
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "torch", "peft", "transformers", "llama_cpp_python")


def cpu_info() -> dict:
    """{"model", "family", "model_number", "flags", "all_flags"}: from /proc/cpuinfo where it exists (Linux),
    else the platform's processor name (family and model number None). "flags" are the ones that change kernel
    choice; "all_flags" every flag."""
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
                    flags = sorted(value.split())
    except OSError:
        pass
    return {"model": model, "family": numbers.get("cpu family"), "model_number": numbers.get("model"),
            "flags": [f for f in flags if f.startswith(FLAG_PREFIXES)], "all_flags": flags}


def isa_env(isa: str) -> dict:
    """Environment for worker processes that should see instruction set ``isa``: {} for "native"; for "avx2",
    LD_PRELOAD of `isa_mask.c` (built once with the system C compiler into the project's cache directory), which
    hides AVX-512, AVX-VNNI and AMX from CPUID. Raises RuntimeError naming what is missing: a C compiler, or
    CPUID faulting (flag ``cpuid_fault`` in /proc/cpuinfo)."""
    if isa == "native":
        return {}
    if isa not in ISA_CHOICES:
        raise ValueError(f"isa must be one of {ISA_CHOICES}, not {isa!r}")
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        raise RuntimeError(f"--isa {isa} needs Linux on x86-64 (this is {platform.system()} {platform.machine()})")
    if "cpuid_fault" not in cpu_info()["all_flags"]:
        raise RuntimeError(f"--isa {isa}: this CPU (or its hypervisor) offers no CPUID faulting (no `cpuid_fault` "
                           "in /proc/cpuinfo), so CPUID cannot be masked; run on a machine of that kind instead")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError(f"--isa {isa} builds {MASK_SOURCE.name} and needs a C compiler (cc, gcc or $CC)")
    source = MASK_SOURCE.read_bytes()
    library = cache_root() / "isa_mask" / f"isa_mask-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(MASK_SOURCE), "-ldl"],
                               capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"building {MASK_SOURCE} with {compiler} failed:\n{built.stderr}")
        partial.replace(library)
    preload = " ".join(filter(None, [str(library), os.environ.get("LD_PRELOAD")]))
    return {"LD_PRELOAD": preload, ISA_ENV: isa}


def reexec_with_isa(isa: str, program: str) -> None:
    """Replace this process by the same command line with `isa_env` (``isa``) set, unless it is "native" or
    already set; the mask must be loaded when a process starts. Exits naming ``program`` where `isa_env`
    cannot be had."""
    if isa == "native" or os.environ.get(ISA_ENV) == isa:
        return
    try:
        extra = isa_env(isa)
    except RuntimeError as error:
        sys.exit(f"{program}: {error}")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], os.environ | extra)


def machine_info(isa: str = "native") -> dict:
    """The machine record stored in every benchmark's JSON; ``isa`` is what the workers were limited to
    (`isa_env`), recorded as "isa" beside the CPU's own flags."""
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
    cpu = cpu_info()
    del cpu["all_flags"]
    return {**cpu, "isa": isa, "cores": os.cpu_count(), "transparent_hugepage": transparent_huge_pages(),
            "accelerator": accelerator, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


def machine_line(info: dict) -> str:
    """One line naming the machine, for printing above a table."""
    flags = ", ".join(info["flags"]) or "no AVX2/AVX-512/AMX"
    if info.get("isa", "native") != "native":
        flags += f"; kernels limited to {info['isa'].upper()} by CPUID masking"
    family = f" family {info['family']} model {info['model_number']}" if info.get("family") is not None else ""
    where = info["accelerator"] or f"{info['cores']} cores"
    pages = f", huge pages {info['transparent_hugepage']}" if info.get("transparent_hugepage") else ""
    libs = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return f"machine: {info['model']}{family} ({flags}), {where}{pages}; {libs}"
