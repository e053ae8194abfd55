"""``python -m jtranspeft.train --config FILE [key=value ...]``: train a (Trans-PEFT) adapter on a frozen base.

Calls `jtranspeft.train` (`jtranspeft.training.finetune`) with the `RunConfig` built from the files and
overrides; the run directory and resuming are described in `jtranspeft.training.loop`. Prints the run's
summary as JSON, then (on stderr) the next step: the evaluate commands that score the new adapter and the bare
base on the same held-out items.
"""

from __future__ import annotations

import sys

import json
import shlex

from jtranspeft.cli.common import cli_main, run_config_job, usage_name

EXAMPLES = """python -m jtranspeft.train --config configs/quickstart.yaml
python -m jtranspeft.train --config configs/quickstart.yaml output_dir=runs/q2 train.max_steps=20
python -m jtranspeft.train --config configs/qwen2-7b_math_transpeft.yaml model.path=/ckpt/Qwen2-7B \\
    data.source=/data/MetaMathQA-395K.json
python -m jtranspeft.train --config configs/quickstart.yaml train.tensorboard=true   # + TensorBoard events
python -m jtranspeft.train --config configs/quickstart.yaml lora.use_dora=true output_dir=runs/dora   # DoRA
python -m jtranspeft.train --config configs/quickstart.yaml peft=shira shira.mask_type=gradient output_dir=runs/shira
python -m jtranspeft.train --config configs/quickstart.yaml peft=rosa rosa.density=0.01 output_dir=runs/rosa
python -m jtranspeft.train --config configs/quickstart.yaml peft=bottleneck bottleneck.size=16 output_dir=runs/adapter
# rerun the same command to resume from the newest checkpoint in output_dir"""


@cli_main
def main(argv=None) -> int:
    """CLI entry point; returns the process exit status (see `jtranspeft.utils.errors`)."""
    return run_config_job(argv, prog=usage_name("train"), examples=EXAMPLES,
                          description="Train a transferable (Trans-PEFT) LoRA adapter.",
                          config="jtranspeft.training.config:RunConfig", job="jtranspeft.training.finetune:train",
                          then=print_next_step)


def next_step(cfg, adapter: str) -> list[str]:
    """The commands that score a finished run's adapter, and the bare base, on the held-out items of its data.

    For a reasoning-gym source these are the eval split the training data was kept apart from (same task,
    generator arguments, seed and template; as many items as ``data.eval_size``); for other sources, a
    template command to fill in with the task's test file.
    """
    data = cfg.data
    if not data.source.startswith("reasoning_gym:"):
        return [f"python -m jtranspeft.evaluate --base {shlex.quote(cfg.model.path)} --adapter {shlex.quote(adapter)} "
                f"--task TASK --data TEST_FILE --template {data.template} --out {shlex.quote(cfg.output_dir + '/eval')}"]
    from jtranspeft.data.config import RG_DEFAULT_EVAL_SIZE

    task = data.source.split(":", 1)[1]
    common = (f"--task rg:{task} --rg-kwargs {shlex.quote(json.dumps(data.rg_kwargs, separators=(',', ':')))} "
              f"--seed {data.seed} --limit {data.eval_size or RG_DEFAULT_EVAL_SIZE} --template {data.template} "
              f"--max-new-tokens {data.max_length} --batch-size 64")
    return [f"python -m jtranspeft.evaluate --base {shlex.quote(cfg.model.path)} --adapter {shlex.quote(adapter)} "
            f"{common} --out {shlex.quote(cfg.output_dir + '/eval')}",
            f"python -m jtranspeft.evaluate --base {shlex.quote(cfg.model.path)} {common} "
            f"--out {shlex.quote(cfg.output_dir + '/eval_base')}"]


def print_next_step(cfg, summary) -> None:
    """Print `next_step` on stderr after a run that ended with an adapter."""
    if summary.get("adapter"):
        commands = next_step(cfg, summary["adapter"])
        what = "the adapter, then the bare base, on the held-out items" if len(commands) == 2 else "the adapter"
        print(f"\nnext: score {what}:\n  " + "\n  ".join(commands), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
