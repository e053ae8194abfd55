"""``python -m jtranspeft.experiment --config FILE [key=value ...] [--report]``: the four-setting experiment.

Builds the `ExperimentConfig` and calls `jtranspeft.run_experiment` (`jtranspeft.analysis.experiment`);
prints the results tables.
"""

from __future__ import annotations

import sys

from jtranspeft.cli.common import cli_main, parse_config_cli

EXAMPLES = """python -m jtranspeft.experiment --config configs/experiments/smollm2_chain_sum.yaml
python -m jtranspeft.experiment --config configs/experiments/smollm2_chain_sum.yaml seeds=[0] eval.limit=100
python -m jtranspeft.experiment --config configs/experiments/chain_sum_lora.yaml output_dir=/tmp/exp
# rerun the same command to continue: finished pieces are kept, a killed training run resumes
# tables from the pieces finished so far, running nothing:
python -m jtranspeft.experiment --config configs/experiments/smollm2_chain_sum.yaml --report"""


@cli_main
def main(argv=None) -> int:
    """CLI entry point; returns the process exit status."""
    config_path, overrides, flags = parse_config_cli(
        argv, "Run the four-setting Trans-PEFT experiment (docs/method.md section 1).", EXAMPLES.splitlines(),
        prog="python -m jtranspeft.experiment",
        switches={"--report": "write the tables from the pieces finished so far; train and score nothing"})
    from jtranspeft.analysis.experiment import ExperimentConfig, format_results, run_experiment
    from jtranspeft.utils.config_io import load_config

    cfg = load_config(ExperimentConfig, [config_path], overrides)
    results = run_experiment(cfg, report_only=flags["report"])
    print(format_results(results))
    print(f"written to {cfg.output_dir}/results.md, results.json, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
