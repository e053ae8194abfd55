"""The four-setting Trans-PEFT experiment (docs/method.md §1) from one config: `run_experiment(config)`.

One experiment = an old base, one or more updated bases, a training recipe (a `RunConfig` YAML) and an
evaluation task. For every variant (recipe overrides: LoRA targets, or another PEFT family such as
``peft: shira``) and seed it trains, with the same data and steps:
- ``plain`` on the old base -> scored on the old base (Fine-tune_o) and on each new base (Direct Transfer);
- one adapter per Trans-PEFT row (``rows``: name -> config overrides, e.g. the paper's p_drop 0.1, masking
  only, dropping only, per-layer or calibrated probabilities; a ``seeds`` entry trains that row with fewer
  seeds) on the old base -> scored on each new base (and on old unless ``score_rows_on_old`` is false);
- ``plain`` on each new base -> scored there (Fine-tune_n, the re-tuned upper bound);
- optionally the training-free projection of the plain old adapter onto each new base (LoRA-X style);
- optionally (``sampled``) the PEFT-portability study's control: an adapter drawn at random with the plain
  old adapter's per-matrix statistics (`jtranspeft.peft.moves.sample_like`), scored on each new base; with
  Fine-tune_n (trained from scratch on the new base with the same budget) it brackets Direct Transfer;
- each base with no adapter at all (``no_adapter``), the floor every adapter must beat.
Seed s trains with ``train.seed = data.seed = s`` (``vary_data_seed``: the data order varies too), and every
setting is scored on the SAME test items, so settings are compared item by item: ``comparisons`` holds, per
new base, Direct Transfer against each Trans-PEFT row (paired over the seeds both have) as the difference
with its paired-bootstrap 95% CI and McNemar's exact p-value (`jtranspeft.analysis.paired`), under exact
match and under the format-blind first-number scorer. Every row also reports the mean generated tokens
(the rows, tables and plot: `jtranspeft.experiments.report`).

With ``update.new`` set, the new base is not given but chosen: the old base and ``update.new`` are
interpolated at each of ``update.lambdas`` (`jtranspeft.training.evolve.interpolate`), and before any
Trans-PEFT adapter is trained each candidate, smallest lambda first, is checked against the gates of
`jtranspeft.analysis.gates` (cheapest measurement first: Direct Transfer, then the FFN-swap attribution, then
Fine-tune_n; a candidate failing one is not measured further). The first candidate that passes every gate
becomes the new base (named ``lambda_<value>``); ``gates.md`` / ``gates.json`` hold every number, and when
no candidate passes they say which gate failed by how much, and no Trans-PEFT row is trained.
The plain settings of every seed run first, then the rows in the config's order (so the order is a
priority). Before all of it, ``analyze`` can run the component-swap attribution / FFN sensitivity of
`jtranspeft.analyze` with the first plain old adapter, so the table can be read against its causes. Every
piece calls the library (`jtranspeft.train`, `jtranspeft.evaluate`, `jtranspeft.analyze`) with typed configs
built from mappings (the recipe file, then the piece's overrides), and a training piece is handed the base the
runner already holds for scoring when it is the one its config names; the CLI is ``python -m
jtranspeft.experiment`` (`jtranspeft.cli.experiment`).

Every piece (a training run, a projection, an evaluation, an analysis) writes into its own directory of
``output_dir`` and counts as done once its final file exists; a killed experiment rerun with the same
command continues (a killed training piece resumes from its checkpoint). The results are
``results.md`` (tables: mean ± std over seeds and a 95% Wilson interval over all scored items),
``results.json`` and ``results.png``, rewritten as each seed finishes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax

from jtranspeft.analysis.analyze import AnalyzeConfig
from jtranspeft.analysis.gates import GateThresholds, UpdateScores, choose_update, format_gates
from jtranspeft.eval.evaluate import EvalConfig
from jtranspeft.experiments.report import item_mean, summarize, write_results
from jtranspeft.utils.config_io import load_config, to_yaml
from jtranspeft.utils.errors import RunStopped

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """Choose the new base among interpolations of (old base, ``new``) by the gates (module docstring)."""

    new: str | None = None  # an updated base; null = use new_bases as given
    lambdas: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    thresholds: GateThresholds = dataclasses.field(default_factory=GateThresholds)

    def __post_init__(self):
        if self.new is not None and not self.lambdas:
            raise ValueError("update.lambdas: give at least one lambda")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """An experiment: bases, training recipe, variants, Trans-PEFT rows, seeds and evaluation."""

    output_dir: str = "runs/experiment"
    train_config: str = "configs/quickstart.yaml"
    train_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    old_base: str = "smollm2"
    new_bases: dict[str, str] = dataclasses.field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1)
    fine_tune_n_seeds: tuple[int, ...] | None = None
    variants: dict[str, dict] = dataclasses.field(default_factory=lambda: {"qkvo": {}})
    rows: dict[str, dict] = dataclasses.field(
        default_factory=lambda: {"paper": {"transpeft.p_drop": 0.1, "transpeft.p_mask": 0.0}})
    projection: bool = False
    sampled: bool = False  # also score the portability study's sampled control on each new base
    score_rows_on_old: bool = True
    no_adapter: bool = True  # also score each base without an adapter
    vary_data_seed: bool = True  # seed s also sets data.seed = s (the training items and their order)
    update: UpdateConfig = dataclasses.field(default_factory=UpdateConfig)
    # how every adapter is scored (merged into the scored base first, unless its family cannot be merged)
    eval: EvalConfig = dataclasses.field(default_factory=lambda: EvalConfig(
        task="rg:chain_sum", limit=500, batch_size=32, max_new_tokens=16, template="alpaca"))
    # the analysis run per new base with the first plain old adapter (sections [] = none); its task is the
    # eval task; the FFN sensitivity is a property of the old base, so it runs with the first new base only
    analyze: AnalyzeConfig = dataclasses.field(default_factory=lambda: AnalyzeConfig(
        sections=("attribution", "sensitivity"), limit=64, sensitivity_limit=32))

    def __post_init__(self):
        if not self.new_bases and self.update.new is None:
            raise ValueError("new_bases: name at least one updated base (name: path), or set update.new")
        if self.update.new is not None and self.new_bases:
            raise ValueError("give either new_bases or update.new (whose gated choice is the new base), not both")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.fine_tune_n_seeds is not None and not set(self.fine_tune_n_seeds) <= set(self.seeds):
            raise ValueError(f"fine_tune_n_seeds {list(self.fine_tune_n_seeds)} must be among seeds {list(self.seeds)}")
        for name in ("plain", *(f"plain_{b}" for b in self.new_bases)):
            if name in self.rows:
                raise ValueError(f"rows: {name!r} is reserved for the plain adapters")


def _done(path: Path) -> bool:
    return path.is_file()


class Experiment:
    """The pieces of one experiment and their cached outputs under ``cfg.output_dir``."""

    def __init__(self, cfg: ExperimentConfig, report_only: bool = False):
        self.cfg, self.out, self.report_only = cfg, Path(cfg.output_dir), report_only
        self.new_bases = dict(cfg.new_bases)  # with update.new: the candidates, then the chosen one
        self.bases: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.timings_file = self.out / "timings.json"
        if self.timings_file.is_file():
            self.timings = json.loads(self.timings_file.read_text())

    # -- bases ---------------------------------------------------------------------------------------
    def base_path(self, name: str) -> str:
        """The checkpoint of base ``name`` ("old" or a new base's name); a GGUF old base is saved as HF once."""
        from jtranspeft.checkpoints.loading import load_base, resolve_model_path, save_base

        if name != "old":
            return self.new_bases[name]
        path = resolve_model_path(self.cfg.old_base)
        if path.suffix != ".gguf":
            return str(path)
        converted = self.out / "bases" / "old"
        if not _done(converted / "config.json"):
            self._timed("convert old base", lambda: save_base(load_base(path), converted))
        return str(converted)

    def base(self, name: str):
        """The loaded base ``name`` (kept in memory for the evaluations)."""
        if name not in self.bases:
            from jtranspeft.checkpoints.loading import load_base

            self.bases[name] = load_base(self.base_path(name))
        return self.bases[name]

    def _timed(self, what: str, fn):
        logger.info("%s ...", what)
        tick = time.perf_counter()
        value = fn()
        self.timings[what] = round(time.perf_counter() - tick, 1)
        self.timings_file.write_text(json.dumps(self.timings, indent=1) + "\n")
        logger.info("%s: %s s", what, self.timings[what])
        return value

    # -- pieces --------------------------------------------------------------------------------------
    def adapter_dir(self, variant: str, trained: str, seed: int) -> Path:
        """Where the adapter ``trained`` ("plain", a row, "plain_<new>" or "projection_<new>") lives."""
        return self.out / "adapters" / variant / trained / f"seed{seed}"

    def row_seeds(self, row: str) -> tuple[int, ...]:
        """The seeds a Trans-PEFT row trains with: its own ``seeds`` entry, else the experiment's."""
        return tuple(self.cfg.rows[row].get("seeds", self.cfg.seeds))

    @staticmethod
    def trained_on(trained: str) -> str:
        """The base a training piece trains on: the new base of "plain_<new>", else "old"."""
        return trained.removeprefix("plain_") if trained.startswith("plain_") else "old"

    def run_config(self, variant: str, trained: str, seed: int):
        """The `RunConfig` of one training piece: the recipe + overrides, variant, row, seed and base."""
        from jtranspeft.training.config import RunConfig

        on = self.trained_on(trained)
        row = {k: v for k, v in self.cfg.rows.get(trained, {}).items() if k != "seeds"}
        seeds = {"train.seed": seed, **({"data.seed": seed} if self.cfg.vary_data_seed else {})}
        overrides = {"output_dir": str(self.adapter_dir(variant, trained, seed)), "model.path": self.base_path(on),
                     **self.cfg.train_overrides, **self.cfg.variants[variant], **row, **seeds}
        return load_config(RunConfig, [self.cfg.train_config], overrides)

    def train(self, variant: str, trained: str, seed: int) -> Path:
        """Train (or resume, or reuse) one adapter; returns its PEFT directory. The base is the one already
        loaded for scoring when it is the base the piece's config names (path and dtypes), else loaded."""
        from jtranspeft.training.finetune import base_differences, train

        run_dir = self.adapter_dir(variant, trained, seed)
        if _done(run_dir / "summary.json") or self.report_only:
            return run_dir / "adapter"
        run_cfg = self.run_config(variant, trained, seed)
        held = self.bases.get(self.trained_on(trained))
        base = held if held is not None and not base_differences(run_cfg.model, held) else None
        try:
            self._timed(f"train {variant}/{trained}/seed{seed}", lambda: train(run_cfg, base=base))
        except RunStopped as stop:
            raise RunStopped(f"training {run_dir} stopped: {stop}", stop.exit_code) from None
        return run_dir / "adapter"

    def project(self, variant: str, new: str, seed: int) -> Path:
        """The plain old adapter projected onto base ``new``'s top singular subspaces (training-free)."""
        from jtranspeft.checkpoints.peft_format import load_peft, save_peft
        from jtranspeft.peft.moves import project_lora

        directory = self.adapter_dir(variant, f"projection_{new}", seed)
        if not _done(directory / "adapter_config.json") and not self.report_only:
            source = self.train(variant, "plain", seed)
            lora = load_peft(source, self.base("old"))
            self._timed(f"project {variant}/seed{seed} onto {new}",
                        lambda: save_peft(project_lora(lora, self.base(new).params), directory, self.base(new)))
        return directory

    def sample(self, variant: str, new: str, seed: int) -> Path:
        """The portability study's sampled control of the plain old adapter (`sample_like`), for base ``new``."""
        from jtranspeft.checkpoints.peft_format import load_peft, save_peft
        from jtranspeft.peft.moves import sample_like

        directory = self.adapter_dir(variant, f"sampled_{new}", seed)
        if not _done(directory / "adapter_config.json") and not self.report_only:
            adapter = load_peft(self.train(variant, "plain", seed), self.base("old"))
            save_peft(sample_like(adapter, jax.random.key(seed)), directory, self.base(new))
        return directory

    def evaluate(self, adapter: Path | None, on: str) -> dict | None:
        """Score ``adapter`` (None: the bare base) merged into base ``on`` (applied unmerged if its family
        cannot be merged), cached in
        ``<piece>/eval/<on>/``; the results plus their ``predictions`` rows, or None when only reporting and
        the score is not there yet."""
        from jtranspeft.checkpoints.peft_format import load_peft
        from jtranspeft.eval.evaluate import evaluate
        from jtranspeft.peft.family import family_of

        if adapter is None:
            piece = self.out / "no_adapter"
        else:
            piece = adapter.parent if adapter.name == "adapter" else adapter  # a training run or a projection
        out = piece / "eval" / on
        if self.report_only and not _done(out / "results.json"):
            return None
        if not _done(out / "results.json"):
            merge = adapter is not None and family_of(load_peft(adapter, self.base(on))).mergeable
            self._timed(f"evaluate {piece.relative_to(self.out)} on {on}",
                        lambda: evaluate(self.base(on), self.cfg.eval, adapter=adapter, merge=merge, out=out))
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        return {**json.loads((out / "results.json").read_text()), "predictions": rows}

    def analyze(self, variant: str, new: str, sections: tuple[str, ...] | None = None) -> Path | None:
        """`jtranspeft.analyze` of (old, ``new``) with the first plain old adapter, if sections are configured
        (or the given ``sections``)."""
        settings = self.cfg.analyze
        sections = settings.sections if sections is None else sections
        if not sections or self.report_only:
            return None
        out = self.out / "analysis" / variant / new
        if not _done(out / "analyze.json"):
            from jtranspeft.analysis.analyze import analyze

            adapter = self.train(variant, "plain", self.cfg.seeds[0])
            if new != next(iter(self.new_bases)):  # FFN sensitivity is measured on the old base: once
                sections = tuple(s for s in sections if s != "sensitivity")
            config = dataclasses.replace(settings, sections=sections, task=self.cfg.eval.task)
            self._timed(f"analyze {variant} old -> {new}",
                        lambda: analyze(self.base("old"), self.base(new), config, adapter, out=out, progress=False))
        return out

    # -- gates ---------------------------------------------------------------------------------------
    def candidate_scores(self, variant: str, name: str, fine_tune_o: dict) -> UpdateScores:
        """The gates' numbers for candidate base ``name``, measured cheapest first; a measurement is skipped
        (None) once an earlier gate has failed."""
        from jtranspeft.analysis.gates import check_gates

        seed, limits = self.cfg.seeds[0], self.cfg.update.thresholds
        direct = self.evaluate(self.train(variant, "plain", seed), name)
        scores = UpdateScores(fine_tune_o=fine_tune_o["accuracy"], fine_tune_n=None, direct=direct["accuracy"],
                              fine_tune_o_tokens=item_mean(fine_tune_o, "new_tokens"),
                              direct_tokens=item_mean(direct, "new_tokens"),
                              fine_tune_o_first=item_mean(fine_tune_o, "first_number"),
                              direct_first=item_mean(direct, "first_number"))
        gates = check_gates(scores, limits)
        if not (gates["b"]["passed"] and gates["c"]["passed"]):
            return scores
        analysis = self.analyze(variant, name, ("attribution",))
        scores = dataclasses.replace(scores, ffn_share=ffn_share(json.loads((analysis / "analyze.json").read_text())))
        if not check_gates(scores, limits)["d"]["passed"]:
            return scores
        fine_tune_n = self.evaluate(self.train(variant, f"plain_{name}", seed), name)
        return dataclasses.replace(scores, fine_tune_n=fine_tune_n["accuracy"])

    def gate_update(self, variant: str) -> dict | None:
        """Interpolate the update, gate the candidates smallest lambda first, write gates.md / gates.json and
        make the chosen candidate the one new base; returns the choice (None when only reporting)."""
        from jtranspeft.training.evolve import interpolate

        update = self.cfg.update
        if self.report_only:
            path = self.out / "gates.json"
            choice = json.loads(path.read_text()) if path.is_file() else None
            if choice and choice["chosen"] is not None:
                name = f"lambda_{choice['chosen']:g}"
                self.new_bases = {name: str(self.out / "bases" / name)}
            return choice
        paths = self._timed("interpolate the update", lambda: interpolate(
            self.base_path("old"), update.new, update.lambdas, self.out / "bases"))
        candidates = {lam: f"lambda_{lam:g}" for lam in sorted(paths)}
        self.new_bases = {name: paths[lam] for lam, name in candidates.items()}
        fine_tune_o = self.evaluate(self.train(variant, "plain", self.cfg.seeds[0]), "old")
        measured = {}
        for lam, name in candidates.items():
            measured[lam] = self.candidate_scores(variant, name, fine_tune_o)
            choice = choose_update(measured, update.thresholds)
            if choice["chosen"] is not None:
                break
        choice = json_safe_choice(choice, measured)
        (self.out / "gates.json").write_text(json.dumps(choice, indent=1) + "\n")
        (self.out / "gates.md").write_text("# Gates of the update\n\n" + format_gates(choice))
        logger.info("gates: %s", choice["reason"])
        self.new_bases = {} if choice["chosen"] is None else {
            candidates[choice["chosen"]]: paths[choice["chosen"]]}
        return choice

    # -- the whole experiment ------------------------------------------------------------------------
    def run(self) -> dict:
        """Run every missing piece (with ``report_only``: none), then write results.md / .json / .png."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "experiment.yaml").write_text(to_yaml(self.cfg))
        gates = self.gate_update(next(iter(self.cfg.variants))) if self.cfg.update.new is not None else None
        if gates is not None and gates["chosen"] is None:
            results = summarize({}, self.cfg, self.timings, gates)
            write_results(results, self.out)
            return results
        if gates is not None and not self.new_bases:  # --report before the gates ran: nothing to table
            return summarize({}, self.cfg, self.timings, gates)
        news = list(self.new_bases)
        for variant in self.cfg.variants:  # every piece's config is checked before any work starts
            for trained in ["plain", *self.cfg.rows, *(f"plain_{new}" for new in news)]:
                self.run_config(variant, trained, self.cfg.seeds[0])
        scores: dict[tuple, dict[int, dict]] = {}

        def record(variant, setting, trained_on, on, seed, result):
            if result is None:  # report_only: not scored yet
                return
            scores.setdefault((variant, setting, trained_on, on), {})[seed] = result

        for variant in self.cfg.variants:
            for new in news:
                self.analyze(variant, new)
            for seed in self.cfg.seeds:  # the plain settings first, then each row in the config's order
                plain = self.train(variant, "plain", seed)
                for on in ["old", *news]:
                    record(variant, "Fine-tune_o" if on == "old" else "Direct Transfer", "old", on, seed,
                           self.evaluate(plain, on))
                for new in news:
                    if self.cfg.projection:
                        record(variant, "Projection (training-free)", "old", new, seed,
                               self.evaluate(self.project(variant, new, seed), new))
                    if self.cfg.sampled:
                        record(variant, "Sampled control", "old", new, seed,
                               self.evaluate(self.sample(variant, new, seed), new))
                    if self.cfg.fine_tune_n_seeds is None or seed in self.cfg.fine_tune_n_seeds:
                        record(variant, "Fine-tune_n", new, new, seed,
                               self.evaluate(self.train(variant, f"plain_{new}", seed), new))
            write_results(summarize(scores, self.cfg, self.timings, gates), self.out)  # partial, as pieces finish
            for row in self.cfg.rows:
                for seed in self.row_seeds(row):
                    adapter = self.train(variant, row, seed)
                    for on in (["old"] if self.cfg.score_rows_on_old else []) + news:
                        record(variant, f"Trans-PEFT [{row}]", "old", on, seed, self.evaluate(adapter, on))
                write_results(summarize(scores, self.cfg, self.timings, gates), self.out)
            if self.cfg.no_adapter:  # the bare bases last: the cheapest rows, and the same for every variant
                for on in ["old", *news]:
                    record(variant, "No adapter", "-", on, self.cfg.seeds[0], self.evaluate(None, on))
                write_results(summarize(scores, self.cfg, self.timings, gates), self.out)
        return summarize(scores, self.cfg, self.timings, gates)


def ffn_share(analysis: dict) -> float | None:
    """The FFN swap's share of the Direct Transfer drop in an analyze.json: accuracy share, or the loss share
    when the accuracy does not move."""
    row = next(r for r in analysis["attribution"]["rows"] if r["name"] == "new ffn")
    share = row["gap_share"]
    return share["accuracy"] if share["accuracy"] is not None else share["loss"]


def json_safe_choice(choice: dict, measured: dict) -> dict:
    """The gates' choice with string keys and the measured numbers beside each lambda."""
    return {"chosen": choice["chosen"], "reason": choice["reason"],
            "gates": {f"{lam:g}": gates for lam, gates in choice["gates"].items()},
            "scores": {f"{lam:g}": dataclasses.asdict(scores) for lam, scores in measured.items()}}


def share_compilations(directory: Path) -> None:
    """Persist XLA compilations on disk: the experiment's many training and evaluation pieces share shapes."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_experiment(cfg: ExperimentConfig, report_only: bool = False) -> dict:
    """Run every missing piece of the experiment (with ``report_only``: none), write results.md / .json /
    .png into ``cfg.output_dir`` and return the summary (see the module docstring)."""
    share_compilations(Path(cfg.output_dir) / "jax_cache")
    return Experiment(cfg, report_only=report_only).run()
