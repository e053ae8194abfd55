"""Label-free fidelity against accuracy on a real pair: SmolLM2-135M-Instruct -> an updated base.

Teacher = old base + a chain_sum adapter. Candidates on the new base: the copied adapter, the two training-free
variants (project, rescale) and, as the "good" reference, the adapter re-tuned on the new base (Fine-tune_n).
Probe prompts are the adapter's own training prompts (its recorded config regenerates them). Accuracies
come from the experiment's evaluations where they exist.

    python benchmarks/fidelity_smollm2.py --experiment runs/experiments/smollm2_update_proof --new lambda_0.5

Writes benchmarks/results/fidelity_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from machine import machine_info, machine_line


def main() -> None:
    """Measure and print fidelity (and accuracy where scored) per candidate."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", type=Path, default=Path("runs/experiments/smollm2_update_proof"))
    parser.add_argument("--new", default="lambda_0.5", help="the new base's name in the experiment")
    parser.add_argument("--variant", default="qkvo")
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fidelity_smollm2.json")
    args = parser.parse_args()

    import jtranspeft as jt
    from jtranspeft.data.config import DataConfig
    from jtranspeft.data.prompts import render
    from jtranspeft.data.sources import load_records
    from jtranspeft.migration.fidelity import fidelity
    from jtranspeft.migration.transfer import transfer

    exp = args.experiment
    adapters = exp / "adapters" / args.variant
    old = jt.load_base(exp / "bases" / "old")
    new = jt.load_base(exp / "bases" / args.new)
    plain = adapters / "plain" / "seed0" / "adapter"
    recorded = jt.read_metadata(plain)["config"]["data"]
    data = DataConfig(**{k: v for k, v in recorded.items() if k != "probe_prompts"})
    prompts = [render(r, data.template, old.tokenizer)[0] for r in load_records(data, "train")[:args.probes]]
    teacher = jt.load_peft(plain, old)
    candidates = {"copy": transfer(plain, new, old).lora,
                  "training-free (project)": transfer(plain, new, old, method="project").lora,
                  "training-free (rescale)": transfer(plain, new, old, method="rescale").lora,
                  "Fine-tune_n (re-tuned on the new base)": jt.load_peft(
                      adapters / f"plain_{args.new}" / "seed0" / "adapter", new)}
    accuracy_files = {"copy": adapters / "plain" / "seed0" / "eval" / args.new / "results.json",
                      "Fine-tune_n (re-tuned on the new base)":
                          adapters / f"plain_{args.new}" / "seed0" / "eval" / args.new / "results.json"}
    rows = []
    for name, lora in candidates.items():
        tick = time.perf_counter()
        scores = fidelity(old, teacher, new, lora, prompts, max_new_tokens=args.tokens)
        acc_file = accuracy_files.get(name)
        accuracy = json.loads(acc_file.read_text())["accuracy"] if acc_file and acc_file.is_file() else None
        rows.append({"candidate": name, **scores, "accuracy": accuracy, "seconds": round(time.perf_counter() - tick, 1)})
        print(f"{name:<42} KL {scores['kl']:.4f}  top-1 {scores['top1']:.3f}  exact {scores['exact']:.3f}  "
              f"accuracy {'-' if accuracy is None else f'{accuracy:.3f}'}  ({rows[-1]['seconds']} s)")
    info = machine_info()
    print(machine_line(info))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"experiment": str(exp), "new": args.new, "probes": len(prompts),
                                    "tokens": args.tokens, "rows": rows, "machine": info}, indent=1) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
