"""``python -m jtranspeft.train --config FILE [key=value ...]``: train a (Trans-PEFT) adapter on a frozen base.

Calls `jtranspeft.train` (`jtranspeft.training.finetune`) with the `RunConfig` built from the files and
overrides; the run directory and resuming are described in `jtranspeft.training.loop`. Prints the run's
summary as JSON.
"""

from __future__ import annotations

import sys

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
                          config="jtranspeft.training.config:RunConfig", job="jtranspeft.training.finetune:train")


if __name__ == "__main__":
    sys.exit(main())
