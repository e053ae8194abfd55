"""Huge pages for the host allocator, so a CPU train step does not fault its buffers in 4 KiB at a time.

XLA:CPU runs a step in one temporary buffer that it allocates and frees every step (2.5 GB for the SmolLM2-135M LoRA
step at 8 x 128: saved activations and the [tokens, vocab] logits). glibc maps such a block afresh each time, so the
kernel faults its pages in one by one, zeroing each: about 620,000 minor faults and 0.5 s of a 2.7 s step on a
2-core AVX-512 EPYC (family 26). With glibc's ``glibc.malloc.hugetlb=1`` tunable, malloc asks for transparent huge
pages (``madvise``), and the same step faults about 1,500 times and takes 2.1 s; peak memory is unchanged
(``benchmarks/train_throughput.py``, docs/performance.md). Keeping the freed block instead (one arena, no mmap, no
trimming) faults nothing but raised peak memory from 3.5 to 5.9-8.3 GB: XLA sometimes allocates the next step's
buffer before freeing the last one, and glibc's heap cannot hand the hole back.

A tunable is read when the process starts, so every CLI run from its own command line re-executes itself
once with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (`reexec_with_huge_pages`, called by
`jtranspeft.cli.common.cli_main`): only on Linux with glibc >= 2.35, only where transparent huge pages are in
``madvise`` mode (``always`` needs no advice, ``never`` allows none), and never when ``GLIBC_TUNABLES`` is
already set (yours wins) or ``JTRANSPEFT_HOST_ALLOCATOR`` is ``default`` / ``0`` / ``off``. A program that
imports jtranspeft can start Python with the same variable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

ENV = "JTRANSPEFT_HOST_ALLOCATOR"
TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, ...] | None:
    """(major, minor) of the process's glibc, or None on another C library or OS."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return tuple(int(part) for part in version().decode().split(".")[:2])


def transparent_huge_pages() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), None where unknown."""
    try:
        text = THP_MODE_FILE.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def huge_page_env() -> dict[str, str]:
    """The environment a process needs for glibc to back its large blocks with huge pages: {} where it is off,
    cannot help (not glibc >= 2.35, huge pages not in ``madvise`` mode) or ``GLIBC_TUNABLES`` is already set."""
    if os.environ.get(ENV, "").strip().lower() in ("default", "0", "off", "false", "no") \
            or "GLIBC_TUNABLES" in os.environ:
        return {}
    version = glibc_version()
    if version is None or version < (2, 35) or transparent_huge_pages() != "madvise":
        return {}
    return {"GLIBC_TUNABLES": TUNABLE}


def describe() -> str:
    """One line on the host allocator in effect, for ``--verbose`` logs."""
    tunables = os.environ.get("GLIBC_TUNABLES")
    setting = f"GLIBC_TUNABLES={tunables}" if tunables else "glibc's defaults"
    return f"host allocator: {setting} (transparent huge pages: {transparent_huge_pages() or 'unknown'})"


def _running_a_jtranspeft_command() -> bool:
    """Whether this process is ``python -m jtranspeft.<job>`` or a ``jtranspeft-<job>`` console script (not
    a test runner or another program that calls a CLI's ``main``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return (spec is not None and spec.name.startswith("jtranspeft.")) \
        or Path(sys.argv[0]).name.startswith("jtranspeft-")


def reexec_with_huge_pages(any_program: bool = False) -> None:
    """Replace this process by the same command line (``sys.orig_argv``) with `huge_page_env` set, when that is
    not empty and this process is a jtranspeft command (or ``any_program``: a benchmark's own script); it does
    not return when it re-executes. Call it before doing any work: the new process starts over, finds
    ``GLIBC_TUNABLES`` set and goes on."""
    extra = huge_page_env()
    if not extra or not (any_program or _running_a_jtranspeft_command()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **extra})
