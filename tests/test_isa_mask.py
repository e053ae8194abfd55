"""`benchmarks/machine.py`'s `isa_env("avx2")`: a process run with it reads no AVX-512 from CPUID (AVX2 and FMA
as the CPU reports them), including in threads it starts, and a SIGSEGV handler of its own still receives real
faults. On a CPU without CPUID faulting the call must refuse with a clear error instead.

The probe is a C program that executes CPUID itself, so what it prints is what any library in the process
(YNNPACK, MKL, oneDNN, LLVM's host detection) reads.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = r"""
#include <cpuid.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

static void report(const char *who) {
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    printf("%s avx2=%u avx512f=%u avx512bw=%u\n", who, (b >> 5) & 1, (b >> 16) & 1, (b >> 30) & 1);
    __cpuid(1, a, b, c, d);
    printf("%s fma=%u\n", who, (c >> 12) & 1);
    fflush(stdout);
}
static void *in_thread(void *unused) { report("thread"); return NULL; }
static void own_handler(int sig) { printf("own handler\n"); fflush(stdout); _exit(7); }

int main(void) {
    pthread_t thread;
    report("main");
    pthread_create(&thread, NULL, in_thread, NULL);
    pthread_join(thread, NULL);
    struct sigaction sa = {0};
    sa.sa_handler = own_handler;
    sigaction(SIGSEGV, &sa, NULL);
    report("after");
    *(volatile int *)0 = 1;
    return 0;
}
"""


def machine_module():
    spec = importlib.util.spec_from_file_location("bench_machine", REPO / "benchmarks" / "machine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def probe(binary: Path, env: dict) -> tuple[int, dict]:
    done = subprocess.run([str(binary)], env=env, capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stdout.splitlines() if "=" in line]
    values = {f"{line.split()[0]}.{k}": int(v) for line in lines for k, v in
              (pair.split("=") for pair in line.split()[1:])}
    return done.returncode, values | {"own_handler": "own handler" in done.stdout}


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler")
def test_avx2_mask_hides_avx512_from_every_thread_and_keeps_the_programs_handler(tmp_path, monkeypatch):
    monkeypatch.setenv("JTRANSPEFT_CACHE", str(tmp_path / "cache"))
    machine = machine_module()
    if "cpuid_fault" not in machine.cpu_info()["all_flags"]:
        with pytest.raises(RuntimeError, match="cpuid_fault"):
            machine.isa_env("avx2")
        return
    (tmp_path / "probe.c").write_text(PROBE)
    subprocess.run([shutil.which("cc") or "gcc", "-O1", "-pthread", "-o", str(tmp_path / "probe"),
                    str(tmp_path / "probe.c")], check=True)
    rc, native = probe(tmp_path / "probe", dict(os.environ))
    assert rc == 7 and native["own_handler"]

    extra = machine.isa_env("avx2")
    assert Path(extra["LD_PRELOAD"].split()[0]).is_file()
    rc, masked = probe(tmp_path / "probe", dict(os.environ) | extra)
    assert rc == 7 and masked["own_handler"], "a real fault must still reach the program's own handler"
    for who in ("main", "thread", "after"):
        assert masked[f"{who}.avx512f"] == 0 and masked[f"{who}.avx512bw"] == 0
        assert masked[f"{who}.avx2"] == native["main.avx2"]
        assert masked[f"{who}.fma"] == native["main.fma"]
    record = machine.machine_info("avx2")
    assert record["isa"] == "avx2" and "limited to AVX2" in machine.machine_line(record)


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="isa must be one of"):
        machine_module().isa_env("avx9")
