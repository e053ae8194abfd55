"""LoRA training step throughput: jtranspeft against PyTorch transformers + peft on the same machine.

The same step on both sides: a random-weight model of the given shape (SmolLM2-135M: 30 layers, hidden 576,
GQA 9/3 heads, vocab 49152, tied embeddings; or a tiny one), LoRA r 8 / alpha 16 on all seven projections,
next-token loss on every token (or, with ``--targets N``, on the last N tokens of each row only: the
response-only loss of instruction tuning, where jtranspeft runs the LM head only at those positions and
PyTorch gets labels -100 elsewhere, as transformers' Trainer would), AdamW. Each measurement runs in its own process (so peak RSS is that
framework's alone), the frameworks alternate round by round, and each process reports the first step
(compile / warm-up) separately from the median of the timed steps.

    python benchmarks/train_throughput.py                       # all shapes, 3 rounds
    python benchmarks/train_throughput.py --shape smollm2 --batch 8 --seq 128 --rounds 2 --steps 5
    python benchmarks/train_throughput.py --shape smollm2 --batch 8 --seq 128 --targets 8 --out \
        benchmarks/results/train_throughput_response.json
    python benchmarks/train_throughput.py --full --shape smollm2 --batch 4 --seq 128 --rounds 2 --steps 3 --out \
        benchmarks/results/train_throughput_full.json
    python benchmarks/train_throughput.py --shape smollm2 --batch 8 --seq 128 --allocator malloc --out \
        benchmarks/results/train_throughput_allocator_malloc.json     # both frameworks on one allocator setting
    python benchmarks/train_throughput.py --shape smollm2 --batch 8 --seq 128 --isa avx2   # AVX2 kernels only

``--isa avx2`` hides AVX-512 from both frameworks' workers (CPUID masked with `benchmarks/isa_mask.c`, built on
first use; needs a C compiler and a CPU or hypervisor with CPUID faulting), so YNNPACK, XLA, MKL and oneDNN pick
the AVX2 + FMA kernels they would pick on an AVX2-only machine such as CI's; the JSON's machine record says so.

``--full`` times continued pre-training instead: no LoRA, AdamW over EVERY parameter (float32), loss on
every token; jtranspeft runs `jtranspeft.training.step.make_full_step` (the step of ``python -m
jtranspeft.evolve``), PyTorch the same model with all parameters trainable.

Results are printed as a table and written to benchmarks/results/train_throughput.json.

Each framework runs with the host allocator settings that are fastest for it here (`allocator_env`, recorded
in the JSON). jtranspeft's are the ones its CLIs give themselves (`jtranspeft.utils.host_memory`): glibc's
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` where transparent huge pages are in madvise mode. XLA runs the step in
one 2.5 GB temporary block that glibc maps afresh every step; with 4 KiB pages that faulted about 620,000
times per step (2.69 s median step), with huge pages about 1,500 (2.12 s; AVX-512 EPYC, 2 rounds x 4 steps).
PyTorch + peft is slower with huge pages (3.73 -> 4.12 s there) and runs with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824`` instead: blocks up to 32 MiB stay on the
heap and freed memory is kept (5.6 -> 4.9 s measured earlier, with a narrower spread). Other things that move
the PyTorch baseline (SmolLM2 shape 8 x 128, median step): other load on the 2 cores (earlier 18-25 s figures
were taken while a second job ran), the attention implementation (sdpa 5.6 s, eager 6.9 s), threads (1
thread 9.0 s vs 2 threads 5.6 s); so PyTorch runs with sdpa attention and 2 threads, and each run records the
1-minute load average it started under and the minor page faults of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import ISA_CHOICES, isa_env, machine_info, machine_line  # puts the repository on sys.path

from jtranspeft.utils import host_memory  # noqa: E402  (the module alone: no JAX)

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True),
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_CASES = [("tiny", 8, 128), ("smollm2", 8, 128), ("smollm2", 4, 256)]
# host allocator settings (see the module docstring); ALLOCATOR: each framework's own, the default
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
HUGE_PAGES = host_memory.huge_page_env()  # what jtranspeft's CLIs give themselves on this machine
ALLOCATOR = {"jax": HUGE_PAGES, "torch": MALLOC_SETTINGS}
ALLOCATOR_CHOICES = {"own": ALLOCATOR, "huge-pages": {"jax": HUGE_PAGES, "torch": HUGE_PAGES},
                     "malloc": {"jax": MALLOC_SETTINGS, "torch": MALLOC_SETTINGS}, "glibc": {"jax": {}, "torch": {}}}


def _hf_model_dir(shape: str, directory: Path) -> Path:
    """A random float32 llama of the shape, saved once as an HF directory both frameworks load."""
    if not (directory / "config.json").is_file():
        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(**SHAPES[shape])
        transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    return directory


def _batch(vocab: int, batch: int, seq: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, size=(batch, seq)).astype(np.int32)


def _loss_mask(batch: int, seq: int, targets: int):
    """float32 [batch, seq]: 1 on the last ``targets`` tokens of each row (0 = every token)."""
    import numpy as np

    mask = np.zeros((batch, seq), np.float32)
    mask[:, seq - targets if targets else 0:] = 1
    return mask


def _minor_faults() -> int:
    """Minor page faults of this process so far (a page touched for the first time since it was mapped)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _per_step(counts: list[int]) -> list[int]:
    """Faults of each timed step (the first, compiling step left out) from the running counts."""
    return [after - before for before, after in zip(counts[1:], counts[2:])]


def run_jax(model_dir: Path, batch: int, seq: int, steps: int, targets: int, full: bool = False) -> dict:
    """Time jtranspeft's jitted LoRA train step (``full``: the continued pre-training step)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jtranspeft as jt
    from jtranspeft.training.config import TrainConfig
    from jtranspeft.models.params import split_by_group
    from jtranspeft.models.spec import GROUPS
    from jtranspeft.training.step import TrainState, make_full_step, make_optimizer, make_step, max_targets_of

    base = jt.load_base(model_dir)
    optimizer = make_optimizer(TrainConfig(lr=1e-4, warmup_steps=0, schedule="constant"), 100)
    if full:
        trained, frozen = split_by_group(base.params, GROUPS)
        base = base.replace(params=frozen)
    else:
        trained = jt.init_lora(base, jt.LoraConfig(r=8, alpha=16, targets=tuple(TARGETS)), jax.random.key(0))
    # committed to the device like the step's outputs, or the second step compiles again (jtranspeft.training.loop
    # places its state with explicit shardings, so training runs never pay that)
    state = jax.device_put(TrainState(trained, optimizer.init(trained), jnp.asarray(0, jnp.int32)), jax.devices()[0])
    del trained
    ids = _batch(base.spec.vocab_size, batch, seq)
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": _loss_mask(batch, seq, targets)}
    if full:
        step = make_full_step(optimizer, grad_accum=1)
    else:
        step = make_step(optimizer, jt.TransPeftConfig(), grad_accum=1, seed=0,
                         max_targets=max_targets_of([{"loss_mask": data["loss_mask"][0]}]) if targets else None)
    times, faults = [], [_minor_faults()]
    for _ in range(steps + 1):
        tick = time.perf_counter()
        state, metrics = step(state, base, data)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - tick)
        faults.append(_minor_faults())
    return {"first_step_s": times[0], "step_times_s": times[1:], "loss": float(metrics["loss"]),
            "page_faults_per_step": _per_step(faults)}


def run_torch(model_dir: Path, batch: int, seq: int, steps: int, targets: int, full: bool = False) -> dict:
    """Time the same step in PyTorch transformers + peft with torch.optim.AdamW (``full``: every parameter
    trained, no peft)."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    if not full:
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.tensor(_batch(model.config.vocab_size, batch, seq), dtype=torch.long)
    labels = torch.where(torch.tensor(_loss_mask(batch, seq, targets)) > 0, ids, -100)
    times, faults = [], [_minor_faults()]
    for _ in range(steps + 1):
        tick = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tick)
        faults.append(_minor_faults())
    return {"first_step_s": times[0], "step_times_s": times[1:], "loss": float(loss.detach()),
            "threads": torch.get_num_threads(), "attention": model.config._attn_implementation,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2 under --isa avx2
            "page_faults_per_step": _per_step(faults)}


def worker(framework: str, shape: str, batch: int, seq: int, steps: int, cache: Path, targets: int,
           full: bool) -> None:
    """One measurement in this process; prints a JSON line."""
    model_dir = _hf_model_dir(shape, cache / shape)
    result = (run_jax if framework == "jax" else run_torch)(model_dir, batch, seq, steps, targets, full)
    median = statistics.median(result["step_times_s"])
    result.update(framework=framework, shape=shape, batch=batch, seq=seq, targets=targets, full=full,
                  median_step_s=median,
                  load_average_1min=os.getloadavg()[0],
                  tokens_per_s=batch * seq / median,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


def main() -> None:
    """Alternate the frameworks over rounds for each case, then print and save the comparison."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process after the first")
    parser.add_argument("--targets", type=int, default=0,
                        help="loss on the last N tokens of each row only (response-only SFT); 0 = every token")
    parser.add_argument("--full", action="store_true",
                        help="continued pre-training: AdamW over every parameter, no LoRA (see above)")
    parser.add_argument("--allocator", choices=sorted(ALLOCATOR_CHOICES), default="own",
                        help="host allocator settings: each framework's own (default; see above), huge pages for "
                             "both, the MALLOC_* settings for both, or glibc's defaults for both")
    parser.add_argument("--isa", choices=ISA_CHOICES, default="native",
                        help="avx2: hide AVX-512 from both frameworks' workers (CPUID masked, benchmarks/machine.py), "
                             "so an AVX-512 machine runs the kernels of an AVX2-only one such as CI's")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/jtranspeft-bench-models"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_throughput.json")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        framework, shape, batch, seq = args.worker
        worker(framework, shape, int(batch), int(seq), args.steps, args.cache, args.targets, args.full)
        sys.stdout.flush()
        os._exit(0)  # the result is printed; skip interpreter teardown (XLA's threads sometimes abort in it)
    cases = [(args.shape, args.batch, args.seq)] if args.shape else DEFAULT_CASES
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    for name in ("GLIBC_TUNABLES", *MALLOC_SETTINGS):  # only --allocator's settings reach the workers
        env.pop(name, None)
    allocator = ALLOCATOR_CHOICES[args.allocator]
    try:
        env |= isa_env(args.isa)
    except RuntimeError as error:
        sys.exit(f"train_throughput: {error}")
    runs = []
    for shape, batch, seq in cases:
        for round_ in range(args.rounds):
            for framework in ("jax", "torch") if round_ % 2 == 0 else ("torch", "jax"):
                cmd = [sys.executable, __file__, "--worker", framework, shape, str(batch), str(seq),
                       "--steps", str(args.steps), "--cache", str(args.cache), "--targets", str(args.targets),
                       *(["--full"] if args.full else [])]
                done = subprocess.run(cmd, env=env | allocator[framework], capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{framework} {shape} failed:\n{done.stderr[-3000:]}")
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]) | {"round": round_})
                print(f"  {shape} b{batch} s{seq} round {round_} {framework}: "
                      f"{runs[-1]['tokens_per_s']:.0f} tok/s, "
                      f"{statistics.median(runs[-1]['page_faults_per_step']):.0f} page faults per step",
                      file=sys.stderr)
    summary = []
    info = machine_info(args.isa)
    print(machine_line(info))
    print(f"{'case':<18} {'jax tok/s':>10} {'torch tok/s':>12} {'ratio':>6} {'jax RSS':>9} {'torch RSS':>10} "
          f"{'jax 1st step':>13} {'torch 1st':>10}")
    for shape, batch, seq in cases:
        row = {"shape": shape, "batch": batch, "seq": seq, "targets": args.targets or seq,
               "mode": "full" if args.full else "lora"}
        for fw in ("jax", "torch"):
            mine = [r for r in runs if (r["framework"], r["shape"], r["batch"], r["seq"]) == (fw, shape, batch, seq)]
            row[fw] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                       "first_step_s": statistics.median(r["first_step_s"] for r in mine),
                       "page_faults_per_step": statistics.median(f for r in mine for f in r["page_faults_per_step"])}
        row["ratio"] = row["jax"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
        summary.append(row)
        print(f"{shape + f' {batch}x{seq}':<18} {row['jax']['tokens_per_s']:10.0f} {row['torch']['tokens_per_s']:12.0f} "
              f"{row['ratio']:6.2f} {row['jax']['peak_rss_mb']:8.0f}M {row['torch']['peak_rss_mb']:9.0f}M "
              f"{row['jax']['first_step_s']:12.1f}s {row['torch']['first_step_s']:9.1f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "allocator": args.allocator, "allocator_env": allocator,
                                    "summary": summary, "runs": runs},
                                   indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
