"""``python -m jtranspeft.experiment --config FILE [key=value ...] [--report]``: the four-setting experiment.

Builds the `ExperimentConfig` and calls `jtranspeft.run_experiment` (`jtranspeft.experiments.runner`);
prints the results tables (`jtranspeft.experiments.report`).
"""

from __future__ import annotations

import sys

from jtranspeft.cli.common import cli_main, parse_config_cli, usage_name

EXAMPLES = """python -m jtranspeft.experiment --config configs/experiments/smollm2_chain_sum.yaml
python -m jtranspeft.experiment --config configs/experiments/smollm2_chain_sum.yaml seeds=[0] eval.limit=100
python -m jtranspeft.experiment --config configs/experiments/chain_sum_lora.yaml output_dir=/tmp/exp
# every PEFT family (LoRA, DoRA, SHiRA, RoSA, bottleneck) plain and with Trans-PEFT, Direct Transfer and the
# portability study's sampled control, on the proof experiment's update:
python -m jtranspeft.experiment --config configs/experiments/smollm2_families.yaml
# rerun the same command to continue: finished pieces are kept, a killed training run resumes
# tables from the pieces finished so far, running nothing:
python -m jtranspeft.experiment --config configs/experiments/smollm2_chain_sum.yaml --report
# ... and rewrite the block <!-- experiment: smollm2_update_proof --> of docs/experiments.md from results.json:
python -m jtranspeft.experiment --config configs/experiments/smollm2_update_proof.yaml --report --readme docs/experiments.md"""


@cli_main
def main(argv=None) -> int:
    """CLI entry point; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    readme = None
    if "--readme" in args:  # a valued option beside parse_cli's switches
        at = args.index("--readme")
        if at + 1 >= len(args):
            raise ValueError("--readme needs a file (the README whose experiment block is rewritten)")
        readme = args[at + 1]
        del args[at:at + 2]
    config_path, overrides, flags = parse_config_cli(
        args, "Run the four-setting Trans-PEFT experiment (docs/method.md section 1; gates and paired "
              "statistics: docs/experiment.md). --readme FILE also rewrites FILE's block between "
              "<!-- experiment: NAME --> and <!-- /experiment: NAME --> (NAME: output_dir's last part).",
        EXAMPLES.splitlines(), prog=usage_name("experiment"),
        switches={"--report": "write the tables from the pieces finished so far; train and score nothing"})
    from jtranspeft.experiments.report import format_results, update_readme
    from jtranspeft.experiments.runner import ExperimentConfig, run_experiment
    from jtranspeft.utils.config_io import load_config

    cfg = load_config(ExperimentConfig, [config_path], overrides)
    results = run_experiment(cfg, report_only=flags["report"])
    if readme:
        update_readme(results, readme)
    print(format_results(results))
    print(f"written to {cfg.output_dir}/results.md, results.json, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
