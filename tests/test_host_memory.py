"""Huge pages for the host allocator: a jtranspeft command re-executes itself with glibc's hugetlb tunable, and
with it a freshly mapped 64 MB block faults in 2 MiB at a time instead of 4 KiB.

Every case runs in a fresh process: glibc reads its tunables when a process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jtranspeft.utils import host_memory

REPO = Path(__file__).resolve().parents[1]
# A worker thread, as XLA's are, allocates a 64 MB block (over glibc's largest mmap threshold, so it is mapped
# afresh), writes it and frees it; the minor page faults that took are counted.
FAULTS = r"""
import ctypes, json, resource, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE, faults = 64 << 20, []

def touch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

worker = threading.Thread(target=touch)
worker.start()
worker.join()
print(json.dumps(faults[0]))
"""


def _env(**extra) -> dict[str, str]:
    """This environment without any allocator setting of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env | extra


def _cli_log(tmp_path, **extra) -> str:
    """``python -m jtranspeft.train --verbose`` on a missing config: stderr, which names the allocator in effect."""
    done = subprocess.run([sys.executable, "-m", "jtranspeft.train", "--config", str(tmp_path / "missing.yaml"),
                           "--verbose"], env=_env(**extra), capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    return done.stderr


def test_a_command_reexecutes_itself_with_huge_pages_where_they_help(tmp_path, monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(host_memory.ENV, raising=False)
    helps = host_memory.huge_page_env() == {"GLIBC_TUNABLES": host_memory.TUNABLE}
    expected = f"GLIBC_TUNABLES={host_memory.TUNABLE}" if helps else "glibc's defaults"
    assert f"host allocator: {expected} (transparent huge pages: " in _cli_log(tmp_path)
    assert "host allocator: glibc's defaults" in _cli_log(tmp_path, **{host_memory.ENV: "off"})
    # the user's own tunables are kept as they are, not extended
    mine = "glibc.malloc.arena_max=2"
    assert f"host allocator: GLIBC_TUNABLES={mine} (" in _cli_log(tmp_path, GLIBC_TUNABLES=mine)


def test_a_program_calling_a_cli_main_is_not_reexecuted():
    # only python -m jtranspeft.<job> / jtranspeft-<job> re-execute; a test runner or script calling main() must not
    script = ("import os; from jtranspeft.cli.common import cli_main\n"
              "@cli_main\ndef main(argv=None):\n    print(os.environ.get('GLIBC_TUNABLES')); return 0\nmain()")
    done = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, check=True)
    assert done.stdout == "None\n"


@pytest.mark.skipif(host_memory.transparent_huge_pages() != "madvise"
                    or (host_memory.glibc_version() or (0,)) < (2, 35),
                    reason="needs glibc >= 2.35 and transparent huge pages in madvise mode")
def test_huge_pages_cut_the_faults_of_a_fresh_block():
    def faults(**extra) -> int:
        done = subprocess.run([sys.executable, "-c", FAULTS], env=_env(**extra), capture_output=True, text=True,
                              check=True)
        return json.loads(done.stdout)

    assert faults() >= 16_000  # 64 MB in 4 KiB pages
    assert faults(GLIBC_TUNABLES=host_memory.TUNABLE) < 1_000  # in 2 MiB pages: 32, plus glibc's edges
