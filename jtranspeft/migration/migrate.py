"""Migrate a fleet of adapters to an updated base: a verdict, then an escalation ladder, judged without labels.

Per adapter (`migrate`): the verdict (`jtranspeft.migration.transfer`); an incompatible adapter is reported
and nothing is written for it. The others climb the ladder until one rung reaches the fidelity threshold
(`jtranspeft.migration.fidelity`, teacher = old base + adapter; ``accept`` names the measure: mean
KL(teacher || candidate) per token at or below ``threshold``, or top-1 agreement at or above it):

1. ``copy``: the same tensors on the new base;
2. ``training-free``: each of ``methods`` (subspace projection, norm rescaling) that applies to the adapter's
   family (`jtranspeft.peft.family.Family.transfer_methods`: LoRA and DoRA); the best fidelity is kept; the
   others are recorded as skipped, with the reason (`NOT_APPLICABLE`);
3. ``distill``: Trans-LoRA-style distillation (`jtranspeft.migration.distill`) into a student of the adapter's
   family and settings, a LoRA or DoRA starting from the best candidate so far;
4. none reached it: ``retrain``, with every rung's numbers.

Probe prompts come from the adapter's ``probe_prompts.jsonl`` (stored at training time, ``data.probe_prompts``)
or else from ``prompts`` (instructions, or a file of them, rendered in the adapter's template; checked before any
model work: at least 2 distinct, none longer than the old base's context). An adapter made elsewhere (peft, or a
llama.cpp LoRA adapter GGUF: no recorded training config) is distilled with settings derived from its own
(`jtranspeft.migration.distill.recorded_or_derived`), its prompts rendered in ``template``. They are split in two disjoint
halves (alternate rows): one measures fidelity, the other seeds distillation, so a distilled adapter is never
judged on its own training prompts (on SmolLM2 that inflated its top-1 agreement to 0.97-1.00). Outputs in ``out``: per adapter
``<name>/adapter`` (the chosen rung's adapter, PEFT format), ``<name>/candidates/`` and ``<name>/result.json``
(written last: a finished adapter is skipped when the command is rerun; a result written for another adapter
of the same name is an error), and for the fleet ``report.json``,
``report.md`` and ``report.png``, each naming every adapter's family (`family_label`). ``export``: the migrated
adapter again in other formats beside ``<name>/adapter`` (`export_adapter`: ``adapter.gguf`` for llama.cpp).

A fleet (``fleet_batch`` K > 1): the adapters not finished yet climb K at a time (`_climb`). Each rung's
fidelity pass is shared by the LoRA adapters (not DoRA) among them: teachers and candidates stacked as adapter
banks, every probe in the same batches (`jtranspeft.migration.fidelity.fleet_fidelity`); distillation
students whose settings agree train in one step (`jtranspeft.training.fleet`) under ``out/fleets/``; the others
go alone. Results equal one-by-one up to float rounding (tests/test_migrate.py); a rung's ``seconds`` is then
the fleet's wall time split evenly and ``fleet`` says how many shared it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

from jtranspeft.data.config import TEMPLATES
from jtranspeft.training import DISTILL_LOSSES
from jtranspeft.migration import METHODS
from jtranspeft.utils.errors import InputError
from jtranspeft.utils.files import write_text_atomic

logger = logging.getLogger(__name__)

# acceptance measure: (how it reads, default threshold, valid range). Measured on SmolLM2 -> its broad FFN update
# (benchmarks/fidelity_smollm2.py, chain_sum): the re-tuned adapter KL 0.118 / top-1 0.77 (accuracy 37.9%), the
# copy 0.780 / 0.47 (7.1%). Over a fleet of three (benchmarks/fleet_smollm2.py, docs/migrate.md) KL <= 0.2 made
# the better decision on every adapter; top-1 >= 0.75 accepted rungs that give the teacher's answer on < 50% of
# items. KL can wrong a distilled adapter, which is more confident than its teacher: hence the option.
ACCEPT = {"kl": ("KL", True, 0.2, math.inf), "top1": ("top-1", False, 0.75, 1.0)}  # label, lower is better,
# default threshold, largest valid threshold (the smallest is 0)


EXPORTS = {"gguf-lora": "adapter.gguf"}  # format: the file written beside each migrated adapter/ (`export_adapter`)


@dataclasses.dataclass(frozen=True)
class MigrateConfig:
    """The ladder's settings: the fidelity threshold, the training-free methods, the distillation budget."""

    accept: str = "kl"  # the acceptance measure: "kl" or "top1" (ACCEPT)
    threshold: float | None = None  # None: ACCEPT's default for the measure
    methods: tuple[str, ...] = ("project", "rescale")
    distill: bool = True
    distill_samples: int = 250
    distill_steps: int = 100
    distill_lr: float | None = None  # None: the adapter's recorded learning rate (made elsewhere: FOREIGN_DEFAULTS)
    distill_batch_size: int | None = None  # None: the adapter's recorded batch size (likewise)
    distill_max_length: int | None = None  # None: the adapter's recorded data.max_length (likewise)
    # tokens | logits | mix: what the student learns of the teacher (DistillConfig). logits: on SmolLM2's fleet
    # (benchmarks/fleet_smollm2.py) it ended closer to the teacher than tokens for all 6 adapters (KL 1.4-5.8x
    # lower); accuracy +8.3 points on one task, -3.0 on another, no significant difference on 4 (docs/migrate.md)
    distill_loss: str = "logits"
    distill_temperature: float = 1.0  # softmax temperature of the logits / mix losses (> 0)
    # logits / mix: k = the teacher's top k stored once before training; None = the teacher beside the student in
    # every step. 32: on SmolLM2 (benchmarks/distill_teacher.py, 2-core AVX-512 EPYC) steps as fast as the tokens
    # loss's (0.93 s vs 1.29 s beside), a 14 s teacher pass once, the same peak RSS; KL within 0.007 of beside on
    # the six-adapter fleet, accuracy the same on 5 of 6 (docs/migrate.md)
    distill_top_k: int | None = 32
    synthesis_shots: int = 3  # seed instructions shown to the new base per synthetic prompt it writes
    synthesis_temperature: float = 0.8  # sampling temperature of the synthetic prompts (> 0)
    template: str = "alpaca"  # the prompt template of adapters made elsewhere (jtranspeft's record their own)
    discriminator: bool = False  # filter the synthetic prompts with a real-vs-synthetic LoRA (Trans-LoRA)
    probe_limit: int = 64  # probe prompts per adapter (half measure fidelity, half seed distillation)
    fidelity_tokens: int = 32  # greedy teacher tokens per probe prompt
    # adapters that climb together: shared fidelity passes, one distillation step for all. 8: on SmolLM2 (2-core
    # AVX-512 EPYC, benchmarks/fleet_throughput.py) 1.37x the adapters per hour of one by one, the same results
    fleet_batch: int = 8
    export: tuple[str, ...] = ()  # more formats of each migrated adapter: "gguf-lora" (llama.cpp, f32)

    def __post_init__(self):
        if self.accept not in ACCEPT:
            raise InputError(f"accept must be one of {sorted(ACCEPT)}, got {self.accept!r}")
        _, _, default, largest = ACCEPT[self.accept]
        if self.threshold is None:
            object.__setattr__(self, "threshold", default)
        if not 0 <= self.threshold <= largest:
            raise InputError(f"threshold for {self.accept} must be in [0, {largest:g}], got {self.threshold}")
        unknown = [m for m in self.methods if m not in METHODS or m == "reuse"]
        if unknown:
            raise InputError(f"methods {unknown}: the training-free rung takes project and/or rescale")
        for name in ("distill_samples", "distill_steps", "probe_limit", "fidelity_tokens", "distill_batch_size",
                     "distill_max_length", "fleet_batch", "synthesis_shots", "distill_top_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.distill_loss not in DISTILL_LOSSES:
            raise InputError(f"distill_loss must be one of {', '.join(DISTILL_LOSSES)}, got {self.distill_loss!r}")
        for name in ("distill_temperature", "synthesis_temperature"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        if set(self.export) - set(EXPORTS):
            raise InputError(f"export formats {sorted(set(self.export) - set(EXPORTS))}: choose from {', '.join(EXPORTS)}")
        if self.template not in TEMPLATES:
            raise InputError(f"template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")

    def badness(self, value: float) -> float:
        """``value`` of the acceptance measure turned so that lower is better (top-1 is negated)."""
        return value if ACCEPT[self.accept][1] else -value

    def passes(self, rung: dict) -> bool:
        """Whether a scored rung reaches the threshold (KL at or below it, top-1 at or above it)."""
        return self.badness(rung[self.accept]) <= self.badness(self.threshold)

    def better(self, rung: dict, than: dict) -> bool:
        """Whether ``rung`` is strictly more faithful than ``than`` by the acceptance measure."""
        return self.badness(rung[self.accept]) < self.badness(than[self.accept])

    def rule(self) -> str:
        """The acceptance rule in words, e.g. "KL <= 0.2"."""
        label, lower, _, _ = ACCEPT[self.accept]
        return f"{label} {'<=' if lower else '>='} {self.threshold}"


def read_prompt_file(path: str | Path) -> list[tuple[str, str]]:
    """(where, prompt) per non-blank prompt of a file (.txt: one per line; .jsonl: a {"prompt": ...} object per
    line), ``where`` = "<file>, line N" for errors; an error for a missing file, a bad row or no prompt at all."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: prompt file not found")
    lines = file.read_text(encoding="utf-8").splitlines()
    labelled = [(f"{path}, line {n}", line) for n, line in enumerate(lines, 1) if line.strip()]
    if file.suffix == ".jsonl":
        labelled = [(where, _prompt_of(where, line)) for where, line in labelled]
    if not labelled:
        raise InputError(f"{path}: no prompts (every line is blank)")
    return labelled


def labelled_prompts(prompts: Sequence[str] | str | Path) -> list[tuple[str, str]]:
    """(where, instruction) per non-blank prompt, ``where`` naming it in errors: a file's (`read_prompt_file`)
    "<file>, line N", a list's "prompt N"; an error for no prompts or fewer than 2 distinct instructions (half
    measure fidelity, half seed distillation)."""
    if isinstance(prompts, (str, Path)):
        source, labelled = str(prompts), read_prompt_file(prompts)
    else:
        source, labelled = "prompts", [(f"prompt {n}", p) for n, p in enumerate(prompts, 1) if p.strip()]
    if not labelled:
        raise InputError(f"{source}: no prompts (every line is blank)")
    distinct = {}
    for where, text in labelled:
        distinct.setdefault(text.strip(), where)
    if len(distinct) < 2:
        raise InputError(f"{source}: only 1 distinct prompt ({labelled[0][0]}); at least 2 are needed (half measure "
                         "fidelity, half seed distillation)")
    return labelled


def _prompt_of(where: str, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise InputError(f"{where}: needs a 'prompt' string")
    return row["prompt"]


def check_prompt_lengths(labelled: Sequence[tuple[str, str]], base) -> None:
    """An error naming the first prompt longer than ``base``'s context (max_position_embeddings), in tokens."""
    context = base.spec.max_position_embeddings
    for where, text in labelled:
        length = len(base.tokenizer.encode(text, add_special_tokens=False))
        if length > context:
            raise InputError(f"{where}: {length} tokens, longer than the old base's context ({context} tokens, "
                             "max_position_embeddings)")


def probe_halves(adapter: Path, prompts: Sequence[str] | None, template: str, tokenizer,
                 limit: int) -> tuple[list[dict], list[dict]]:
    """(fidelity probes, distillation seeds): the `probe_rows` split in two disjoint halves, alternate rows."""
    rows = probe_rows(adapter, prompts, template, tokenizer, limit)
    if len(rows) < 2:
        raise InputError(f"{adapter}: {len(rows)} probe prompt; at least 2 are needed (half measure fidelity, half "
                         "seed distillation)")
    return rows[0::2], rows[1::2]


def probe_rows(adapter: Path, prompts: Sequence[str] | None, template: str, tokenizer, limit: int) -> list[dict]:
    """{"instruction", "prompt"} rows, one per distinct instruction: the adapter's stored training prompts, else
    ``prompts`` rendered."""
    from jtranspeft.checkpoints.peft_format import PROBES_FILE
    from jtranspeft.data.prompts import render

    stored = adapter / PROBES_FILE
    if stored.is_file():
        rows = [json.loads(line) for line in stored.read_text(encoding="utf-8").splitlines() if line.strip()]
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("instruction", "prompt")):
                raise InputError(f"{stored}, row {number}: needs 'instruction' and 'prompt' strings")
    elif prompts:
        rows = [{"instruction": p, "prompt": render({"instruction": p, "input": "", "output": ""}, template,
                                                    tokenizer)[0]} for p in prompts]
    else:
        raise InputError(f"{adapter}: no {PROBES_FILE} (train with data.probe_prompts > 0) and no prompts given "
                         "(--prompts)")
    return list({row["instruction"].strip(): row for row in rows}.values())[:limit]


# Why a training-free method does not apply to a family (`jtranspeft.peft.family.Family.transfer_methods`); the
# ladder records the method as skipped with this reason. Both methods re-shape a low-rank delta s A B against
# the new weight (`jtranspeft.peft.moves`): project keeps its part in the weight's dominant singular subspaces,
# rescale keeps its size relative to the weight.
NOT_APPLICABLE = {
    "shira": "its delta is a fixed sparse support, which a projection would fill in and a rescale has no low-rank "
             "factors to act on",
    "rosa": "its sparse part has a fixed support that neither method keeps (a projection fills it in), and moving "
            "only its LoRA part would break the pair",
    "bottleneck": "it is not a weight delta (it acts on activations after attention and FFN)",
}


def family_label(directory: Path) -> str:
    """The adapter's family as reports name it, read from its files without the weights: lora, dora (LoRA with
    ``use_dora``), shira, rosa or bottleneck."""
    from jtranspeft.checkpoints.adapter_files import CONFIG_FILE, ROSA_FILE, is_gguf_adapter, peft_type
    from jtranspeft.utils.validate import read_json_object

    if is_gguf_adapter(directory):  # llama.cpp's adapter GGUF holds LoRA adapters only
        return "lora"
    if (directory / ROSA_FILE).is_file():
        return "rosa"
    kind = peft_type(directory).lower()
    if kind == "lora" and read_json_object(directory / CONFIG_FILE).get("use_dora"):
        return "dora"
    return kind


def not_applicable(method: str, adapter) -> str:
    """Why training-free ``method`` is skipped for ``adapter`` (a family without it in its transfer methods)."""
    from jtranspeft.peft.family import family_of

    family = family_of(adapter)
    return (f"{method!r} does not apply to a {family.name} adapter (it moves by "
            f"{', '.join(family.transfer_methods)}): {NOT_APPLICABLE.get(family.name, 'not in its transfer methods')}")


def _names(adapters: Sequence[Path]) -> list[str]:
    """A distinct directory name per adapter (".../run/adapter" is named "run", ".../math.gguf" "math")."""
    names = []
    for path in adapters:
        name = path.parent.name if path.name == "adapter" else path.stem if path.suffix == ".gguf" else path.name
        base, k = name, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


class _Ladder:
    """One adapter's climb: its teacher, probes and seeds, and every rung scored so far (`_climb` drives it)."""

    def __init__(self, cfg: MigrateConfig, old, new, adapter: Path, out: Path, prompts):
        self.cfg, self.old, self.new, self.adapter, self.out = cfg, old, new, adapter, out
        self.prompts, self.rungs, self.teacher, self.template = prompts, [], None, "alpaca"
        self.probes, self.seeds = None, None  # fidelity probes and distillation seeds: disjoint halves
        self.reasons: list[str] = []
        self.answers = None  # the teacher's answers to the probes (`TeacherAnswers`), made on first use
        self.skipped: list[dict] = []  # training-free methods that do not apply to the family, with the reason
        self.best: dict | None = None

    def moved(self, method: str) -> tuple | None:
        """(rung name, adapter, directory, start time) of ``method``'s candidate, written to candidates/<rung>;
        None (and the reasons) when incompatible."""
        from jtranspeft.checkpoints.peft_format import read_metadata
        from jtranspeft.migration.transfer import transfer, write_transfer

        started = time.perf_counter()
        result = transfer(self.adapter, self.new, self.old, method=method)
        if not result.compatible:
            self.reasons = list(result.reasons)
            return None
        if self.teacher is None:
            self.teacher = result.source_lora
            recorded = read_metadata(self.adapter).get("config") or {}
            self.template = recorded.get("data", {}).get("template", self.cfg.template)
            self.probes, self.seeds = probe_halves(self.adapter, self.prompts, self.template, self.old.tokenizer,
                                                   self.cfg.probe_limit)
        directory = self.out / "candidates" / ("copy" if method == "reuse" else method)
        if not (directory / "adapter_config.json").is_file():
            write_transfer(result, self.new, out=directory)
        return "copy" if method == "reuse" else f"training-free ({method})", result.lora, directory, started

    def record(self, name: str, scores: dict, directory: Path, seconds: float, fleet: int = 1) -> dict:
        """Add a scored rung (``fleet``: how many adapters shared its fidelity pass) and keep the best."""
        rung = {"rung": name, **scores, "adapter": str(directory), "seconds": round(seconds, 1),
                **({"fleet": fleet} if fleet > 1 else {})}
        self.rungs.append(rung)
        if self.best is None or self.cfg.better(rung, self.best):
            self.best = rung
        logger.info("%s: %s KL %.4f top-1 %.3f", self.adapter, name, scores["kl"], scores["top1"])
        return rung

    def student(self) -> dict:
        """The training config to distil with: the adapter's recorded or derived one (`recorded_or_derived`), with
        the config's ``distill_batch_size`` and ``distill_max_length`` over it."""
        from jtranspeft.migration.distill import recorded_or_derived

        recorded = recorded_or_derived(self.adapter, self.old, self.cfg.template)
        data, train = dict(recorded.get("data", {})), dict(recorded.get("train", {}))
        if self.cfg.distill_batch_size:
            train.update(batch_size=self.cfg.distill_batch_size, grad_accum=1)
        if self.cfg.distill_max_length:
            longest = self.cfg.distill_max_length
            data.update(max_length=longest, buckets=[b for b in data.get("buckets", ()) if b < longest] + [longest])
        return {**recorded, "data": data, "train": train}

    def prepare_student(self):
        """The adapter's distillation, ready to train (`jtranspeft.migration.distill.prepare_student`): seeds,
        held-out probes, the student's settings, starting from the best candidate so far."""
        from jtranspeft.migration.distill import prepare_student

        cfg = self.cfg
        return prepare_student(self.old, self.adapter, self.new, [p["instruction"] for p in self.seeds],
                               self.out / "distill", samples=cfg.distill_samples, steps=cfg.distill_steps,
                               moved=self.best["adapter"], lr=cfg.distill_lr, discriminator=cfg.discriminator,
                               loss=cfg.distill_loss, temperature=cfg.distill_temperature, top_k=cfg.distill_top_k,
                               shots=cfg.synthesis_shots, synthesis_temperature=cfg.synthesis_temperature,
                               held_out=[p["instruction"] for p in self.probes], recorded=self.student())

    def result(self) -> dict:
        """The result dict of result.json."""
        if self.best is None:
            return {"status": "incompatible", "family": family_label(self.adapter), "reasons": self.reasons,
                    "rungs": []}
        migrated = self.cfg.passes(self.best)
        return {"status": "migrated" if migrated else "retrain", "family": family_label(self.adapter),
                "chosen": self.best["rung"] if migrated else None, "best": self.best, "rungs": self.rungs,
                "skipped": self.skipped, "probe_prompts": len(self.probes), "seed_prompts": len(self.seeds)}


FLEET_DECODE_BATCH = 32  # rows per decoding batch when a fleet's adapters share the fidelity passes


def _bankable(lora) -> bool:
    """Whether an adapter can join a per-row `AdapterBank` (a LoRA that is not a DoRA)."""
    from jtranspeft.peft.lora import Lora

    return isinstance(lora, Lora) and not lora.config.use_dora


def _score(scored: list[tuple], old, new, cfg: MigrateConfig) -> None:
    """Score candidates ``(ladder, (rung name, adapter, directory, start time))`` by fidelity to their teachers
    and record each rung. LoRA adapters (not DoRA) of several ladders share the passes: teachers and candidates
    each stacked into an `AdapterBank`, the probes of all in the same batches (`fleet_fidelity`); the others, or
    a single one, are scored alone. Each ladder's teacher answers its probes once, on first use."""
    from jtranspeft.migration.fidelity import TeacherAnswers, fleet_fidelity, fleet_teacher_answers

    shared = [k for k, (ladder, candidate) in enumerate(scored) if _bankable(ladder.teacher) and _bankable(candidate[1])]
    groups = [[scored[k] for k in shared]] if len(shared) > 1 else []
    groups += [[item] for k, item in enumerate(scored) if len(shared) < 2 or k not in shared]
    tokens = cfg.fidelity_tokens
    for group in groups:
        ladders = [ladder for ladder, _ in group]
        batch_size = FLEET_DECODE_BATCH if len(group) > 1 else 8
        unanswered = [ladder for ladder in ladders if ladder.answers is None]
        if unanswered:  # the teachers answer their probes together, one base pass for all
            made = fleet_teacher_answers(old, _one_or_bank([ladder.teacher for ladder in unanswered]),
                                         [[p["prompt"] for p in ladder.probes] for ladder in unanswered],
                                         max_new_tokens=tokens, batch_size=batch_size,
                                         add_special_tokens=[ladder.template != "chat" for ladder in unanswered])
            owners = made.adapter_ids or [0] * len(made.prompt_ids)
            for i, ladder in enumerate(unanswered):
                mine = [k for k, owner in enumerate(owners) if owner == i]
                ladder.answers = TeacherAnswers([made.prompt_ids[k] for k in mine], [made.answers[k] for k in mine])
        answers = TeacherAnswers([ids for ladder in ladders for ids in ladder.answers.prompt_ids],
                                 [ids for ladder in ladders for ids in ladder.answers.answers],
                                 [i for i, ladder in enumerate(ladders) for _ in ladder.answers.prompt_ids]
                                 if len(group) > 1 else None)
        results = fleet_fidelity(old, _one_or_bank([ladder.teacher for ladder in ladders]), new,
                                 _one_or_bank([candidate[1] for _, candidate in group]), answers,
                                 max_new_tokens=tokens, batch_size=batch_size)
        first = min(candidate[3] for _, candidate in group)
        share = (time.perf_counter() - first) / len(group)  # the rung's wall time, split evenly over a fleet
        for (ladder, (name, _, directory, _)), scores in zip(group, results):
            ladder.record(name, scores, directory, share, len(group))


def _one_or_bank(adapters: list):
    """The one adapter itself (any family), or several LoRAs stacked into an `AdapterBank`."""
    from jtranspeft.peft.bank import stack_adapters

    return adapters[0] if len(adapters) == 1 else stack_adapters(adapters)


def _distill(ladders: list[_Ladder], old, new, out: Path) -> None:
    """The distillation rung of ``ladders``: each one's synthetic set made (`_Ladder.prepare_student`), then the
    students that can share a train step (`jtranspeft.training.fleet.fleet_key`) trained as one fleet under
    ``out/fleets``, the others alone; every student scored (`_score`)."""
    from jtranspeft.checkpoints.peft_format import load_peft
    from jtranspeft.training.fleet import fleet_directory, fleet_key, train_fleet

    started = time.perf_counter()
    students = [ladder.prepare_student() for ladder in ladders]
    groups: dict = {}
    for ladder, student in zip(ladders, students):
        key = fleet_key(student.cfg)
        groups.setdefault(id(ladder) if key is None else key, []).append((ladder, student))
    made = []
    for group in groups.values():
        if len(group) > 1:
            cfgs = [student.cfg for _, student in group]
            summaries = train_fleet(cfgs, fleet_directory(out / "fleets", cfgs), base=new, teacher=old)
        else:
            summaries = [group[0][1].train(old)]
        for (ladder, student), summary in zip(group, summaries):
            result = student.result(summary)
            made.append((ladder, ("distill", load_peft(result["adapter"], new), Path(result["adapter"]), started),
                         result, len(group)))
    _score([(ladder, candidate) for ladder, candidate, _, _ in made], old, new, ladders[0].cfg)
    share = (time.perf_counter() - started) / len(ladders)  # synthesis, training and scoring, split evenly
    for ladder, _, result, fleet in made:
        rung = ladder.rungs[-1]
        # init: from the best candidate ("moved") or afresh; synthesis: what the synthetic set was like (synthesis.json)
        rung.update(init=result["init"], seconds=round(share, 1), synthesis=result["synthesis"],
                    train_seconds=result["summary"].get("wall_s"))
        if fleet > 1:  # a distilled rung's fleet: the students trained together
            rung["fleet"] = fleet
        else:
            rung.pop("fleet", None)


def _climb(ladders: list[_Ladder], out: Path) -> None:
    """Every ladder up the rungs until its best candidate passes (module docstring), the fleet's fidelity passes
    and distillation shared where the adapters allow (`_score`, `_distill`)."""
    from jtranspeft.peft.family import family_of

    if not ladders:
        return
    cfg, old, new = ladders[0].cfg, ladders[0].old, ladders[0].new
    live = []
    for ladder in ladders:
        copy = ladder.moved("reuse")
        if copy is not None:
            live.append((ladder, copy))
    _score(live, old, new, cfg)
    live = [ladder for ladder, _ in live]
    for method in cfg.methods:
        scored = []
        for ladder in live:
            if cfg.passes(ladder.best):
                continue
            if method not in family_of(ladder.teacher).transfer_methods:
                ladder.skipped.append({"rung": f"training-free ({method})",
                                       "reason": not_applicable(method, ladder.teacher)})
                continue
            scored.append((ladder, ladder.moved(method)))
        _score(scored, old, new, cfg)
    waiting = [ladder for ladder in live if not cfg.passes(ladder.best)]
    if waiting and cfg.distill:
        _distill(waiting, old, new, out)


def migrate(adapters: Sequence[str | Path], old_base: str | Path, new_base: str | Path, out: str | Path,
            config: MigrateConfig = MigrateConfig(), prompts: Sequence[str] | str | Path | None = None,
            progress: bool = True) -> dict:
    """Migrate every adapter (module docstring); returns the fleet report (also ``out/report.json``).

    ``prompts``: probe instructions for adapters without stored ones, or a file of them (`labelled_prompts`).
    The adapters not finished yet climb ``config.fleet_batch`` at a time (`_climb`)."""
    import shutil

    from jtranspeft.checkpoints.adapter_files import check_adapter_dir
    from jtranspeft.checkpoints.loading import load_base
    from jtranspeft.utils.progress import progress_bar

    adapters = [check_adapter_dir(a) for a in adapters]
    if "gguf-lora" in config.export:
        for adapter in adapters:
            if family_label(adapter) != "lora":
                raise InputError(f"{adapter}: a {family_label(adapter)} adapter cannot be written as a llama.cpp LoRA "
                                 "adapter (--export gguf-lora); migrate without it and merge the result into the base "
                                 "instead (python -m jtranspeft.export --format gguf)")
    labelled = None if prompts is None else labelled_prompts(prompts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = load_base(old_base)
    if labelled:
        check_prompt_lengths(labelled, old)
        prompts = [text for _, text in labelled]
    new = load_base(new_base)
    results: dict[str, dict] = {}
    pending = []
    for adapter, name in zip(adapters, _names(adapters)):
        done = out / name / "result.json"
        if done.is_file():
            finished = json.loads(done.read_text(encoding="utf-8"))
            if Path(finished.get("source", "")).resolve() != adapter.resolve():
                raise InputError(f"{done}: written for adapter {finished.get('source')}, not {adapter} (both are "
                                 f"named {name!r}); migrate into another --out or remove {out / name}")
            results[name] = finished
        else:
            pending.append((adapter, name))
    bar = progress_bar(total=len(adapters), initial=len(results), desc="adapters", unit="adapter", enabled=progress)
    for start in range(0, len(pending), config.fleet_batch):
        chunk = pending[start:start + config.fleet_batch]
        tick = time.perf_counter()
        ladders = []
        for adapter, name in chunk:
            (out / name).mkdir(exist_ok=True)
            ladders.append(_Ladder(config, old, new, adapter, out / name, prompts))
        _climb(ladders, out)
        seconds = (time.perf_counter() - tick) / len(chunk)  # a fleet's wall time, split evenly
        for ladder, (adapter, name) in zip(ladders, chunk):
            result = ladder.result()
            target = out / name
            if result["status"] == "migrated":
                final = target / "adapter"
                if final.exists():
                    shutil.rmtree(final)
                shutil.copytree(result["best"]["adapter"], final)
                export_adapter(final, new, config.export)
            result.update(name=name, source=str(adapter), seconds=round(seconds, 1),
                          **({"fleet": len(chunk)} if len(chunk) > 1 else {}))
            write_text_atomic(target / "result.json", json.dumps(result, indent=1) + "\n")  # last: marks it finished
            results[name] = result
        bar.update(len(chunk))
    bar.close()
    report = {"old_base": str(old_base), "new_base": str(new_base), "config": dataclasses.asdict(config),
              "adapters": [results[name] for name in _names(adapters)]}
    write_text_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(format_report(report), encoding="utf-8")
    plot_report(report, out / "report.png")
    return report


def export_adapter(directory: Path, base, formats: Sequence[str]) -> None:
    """Write the migrated adapter in ``directory`` (PEFT format) again in each of ``formats`` beside it
    (`EXPORTS`): ``gguf-lora``, llama.cpp's LoRA adapter GGUF in float32 with the same metadata."""
    from jtranspeft.checkpoints.gguf_adapter import save_gguf_adapter
    from jtranspeft.checkpoints.peft_format import load_peft, read_metadata

    for name in formats:
        target = directory.parent / EXPORTS[name]
        target.unlink(missing_ok=True)  # a rerun after a kill between the export and result.json
        save_gguf_adapter(load_peft(directory, base), target, base, metadata=read_metadata(directory))


def _config_of(report: dict) -> MigrateConfig:
    """The `MigrateConfig` a report was made with (reports written before ``accept`` existed used KL)."""
    fields = {f.name for f in dataclasses.fields(MigrateConfig)}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in report["config"].items() if k in fields}
    return MigrateConfig(**saved)


def format_report(report: dict) -> str:
    """Markdown: one row per adapter (status, chosen rung, family, KL of copy and of the best rung, cost), then
    the training-free methods skipped because they do not apply to the adapter's family."""
    lines = ["# Migration report", "",
             f"old base `{report['old_base']}` -> new base `{report['new_base']}`; fidelity threshold "
             f"{_config_of(report).rule()} (teacher = old base + adapter; KL in nats per token).", "",
             "| adapter | status | chosen rung | family | KL copy | top-1 copy | best rung | KL best | top-1 best | "
             "seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["adapters"]:
        family = r.get("family", "lora")  # reports written before families were recorded held LoRA adapters
        if r["status"] == "incompatible":
            lines.append(f"| {r['name']} | incompatible: {'; '.join(r['reasons'])} | - | {family} | - | - | - | - | - "
                         f"| {r['seconds']} |")
            continue
        copy, best = r["rungs"][0], r["best"]
        lines.append(f"| {r['name']} | {r['status']} | {r['chosen'] or '-'} | {family} | {copy['kl']:.4f} "
                     f"| {copy['top1']:.3f} | {best['rung']} | {best['kl']:.4f} | {best['top1']:.3f} "
                     f"| {r['seconds']} |")
    skipped = [(r["name"], s) for r in report["adapters"] for s in r.get("skipped", ())]
    if skipped:
        lines += ["", "Skipped (not applicable to the family):", ""]
        lines += [f"- {name}: {s['rung']}: {s['reason']}" for name, s in skipped]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """Horizontal bars per adapter: the acceptance measure of the copied adapter and of the best rung, worst
    first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = _config_of(report)
    measure = config.accept
    rows = sorted((r for r in report["adapters"] if r["status"] != "incompatible"),
                  key=lambda r: -config.badness(r["best"][measure]))  # worst first
    fig, ax = plt.subplots(figsize=(7, 1 + 0.5 * max(len(rows), 1)))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["rungs"][0][measure] for r in rows], height=0.4, label="copy",
            color="tab:gray")
    ax.barh([y - 0.2 for y in ys], [r["best"][measure] for r in rows], height=0.4, label="best rung",
            color="tab:blue")
    ax.axvline(report["config"]["threshold"], color="tab:red", linestyle="--", label="threshold")
    ax.set_yticks(list(ys), [f"{r['name']} ({r.get('family', 'lora')}, {r['status']})" for r in rows])
    ax.set_xlabel("KL(teacher || candidate), nats per token" if measure == "kl"
                  else "top-1 agreement with the teacher")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
