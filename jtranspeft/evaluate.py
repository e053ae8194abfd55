"""`python -m jtranspeft.evaluate`: score a base model (optionally with a LoRA adapter) on a task.

One run = load the base (HF directory or .gguf) and the adapter (HF PEFT directory; ``--merge`` folds
it into the base first, as the paper evaluates transferred modules) -> load the task's items from the
registry in `jtranspeft.eval.tasks` -> build each prompt with the training template
(`jtranspeft.data.prompts.render`; GSM8K and MATH add " Let's think step by step.", method.md §5) ->
score. Three kinds of scoring:

- generation (default): greedy `jtranspeft.generate`, cut at "Instruction:" / "Response:", then the
  task's own scorer (`jtranspeft.eval.scorers`);
- ``--scoring loglik``: pick the option with the highest summed log-prob (`jtranspeft.eval.loglik`):
  commonsense tasks score "the correct answer is <label>" for every label of the task, and
  ``--task-type choice`` reads JSONL rows {"question", "choices": [...], "answer": index or text};
- ``--perplexity FILE``: exp(mean NLL) of a UTF-8 text file.

Outputs in ``--out``: ``results.json`` (accuracy with a 95% Wilson interval, counts, settings, wall
time, generated tokens/s) and ``predictions.jsonl`` (one row per item: prompt, output, extracted answer,
gold, verdict). Bad input (a missing file, an unknown task) is one line on stderr and exit status 2.
Heavy imports (JAX, the model code) happen inside the functions, so ``--help`` and input errors answer
at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  # reasoning-gym task, generated offline (200 items unless --limit)
  python -m jtranspeft.evaluate --base model.gguf --task rg:basic_arithmetic --limit 50 --out runs/eval
  # GSM8K test file with a PEFT adapter merged into the base (the paper's protocol)
  python -m jtranspeft.evaluate --base ./Llama-3.2-1B --adapter runs/lora --merge \\
      --data gsm8k_test.jsonl --task-type gsm8k --out runs/eval-gsm8k
  # commonsense by log-likelihood of each label instead of generation
  python -m jtranspeft.evaluate --base ./model --data boolq_test.json --task-type boolq --scoring loglik
  # multiple choice from JSONL rows {"question", "choices": [...], "answer": 0}
  python -m jtranspeft.evaluate --base ./model --data mc.jsonl --task-type choice
  # perplexity of a text file
  python -m jtranspeft.evaluate --base model.gguf --perplexity shakespeare.txt --window 512
"""

THINK_SUFFIX = " Let's think step by step."
STOP_STRINGS = ("### Instruction:", "### Response:", "Instruction:", "Response:")
COMMONSENSE_ANSWER = "the correct answer is {label}"
MAX_NEW_TOKENS = {"gsm8k": 1024, "math": 2048}  # method.md §5; commonsense 32, reasoning-gym 512
CHOICE = "choice"


class InputError(Exception):
    """A problem with the command line or its files; reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see --help)."""
    parser = argparse.ArgumentParser(prog="python -m jtranspeft.evaluate", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base model: HF checkpoint directory, .gguf file or hub id")
    parser.add_argument("--adapter", help="HF PEFT LoRA adapter directory (applied unmerged unless --merge)")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base before decoding")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", "--task-type", dest="task",
                      help="gsm8k, math, boolq, piqa, siqa, hellaswag, winogrande, arc_e, arc_c, obqa (these "
                           "read --data), choice (JSONL multiple choice, reads --data) or rg:<reasoning-gym name>")
    what.add_argument("--perplexity", metavar="FILE", help="report the perplexity of this UTF-8 text file")
    parser.add_argument("--data", metavar="FILE", help="the task's test file")
    parser.add_argument("--limit", type=int, help="score the first N items (reasoning-gym: generate N; default 200)")
    parser.add_argument("--seed", type=int, default=42,
                        help="reasoning-gym seed; items come from the training config's eval split for this seed")
    parser.add_argument("--rg-kwargs", type=json.loads, default=None, metavar="JSON",
                        help="reasoning-gym generator arguments, as the training config's data.rg_kwargs, "
                             "e.g. '{\"max_terms\": 3}'")
    parser.add_argument("--out", help="output directory (default: eval-<task>)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="generation budget (default: gsm8k 1024, math 2048, commonsense 32, others 512)")
    parser.add_argument("--scoring", choices=("generate", "loglik"), default=None,
                        help="generate (default) or loglik (commonsense tasks; always for 'choice')")
    parser.add_argument("--template", choices=("alpaca", "commonsense", "chat", "plain"),
                        help="prompt template, as in training (default: commonsense for commonsense tasks, "
                             "else alpaca)")
    parser.add_argument("--window", type=int, default=1024, help="perplexity window in tokens (default 1024)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="storage dtype of the base weights (default float32)")
    return parser


def _check_inputs(args) -> None:
    """Fail fast, before loading any model, on missing files and unknown tasks."""
    if not Path(args.base).exists() and args.base.count("/") != 1:  # "org/name" may be a hub id
        raise InputError(f"--base {args.base}: no such file or directory")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise InputError(f"--adapter {args.adapter}: not a PEFT adapter directory (no adapter_config.json)")
    if args.merge and not args.adapter:
        raise InputError("--merge needs --adapter")
    for flag, path in (("--data", args.data), ("--perplexity", args.perplexity)):
        if path and not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file")
    if args.perplexity:
        return
    from jtranspeft.eval import scorers, tasks

    if args.task != CHOICE:
        try:
            tasks.get_task(args.task)
        except ValueError as err:
            raise InputError(str(err)) from None
    needs_file = not args.task.startswith("rg:")
    if needs_file and not args.data:
        raise InputError(f"task {args.task!r} reads a test file: pass --data FILE")
    if needs_file and args.rg_kwargs:
        raise InputError(f"--rg-kwargs applies to rg:<name> tasks, not {args.task!r}")
    if not needs_file and args.data:
        raise InputError(f"task {args.task!r} is generated by reasoning-gym and reads no --data file")
    if args.scoring == "loglik" and args.task not in scorers.COMMONSENSE_LABELS and args.task != CHOICE:
        raise InputError(f"--scoring loglik needs a commonsense task or 'choice', not {args.task!r}")
    if args.task == CHOICE and args.scoring == "generate":
        raise InputError("task 'choice' is scored by log-likelihood only")


def _load_choice(path: str, limit: int | None) -> list[dict]:
    """JSONL rows {"question", "choices": [str, ...], "answer": index or one of the choices}."""
    from jtranspeft.eval.tasks import _read_jsonl  # the registry's reader: errors name file and row

    items = []
    for row_number, row in _read_jsonl(path)[:limit]:
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(row.get("question"), str) or not isinstance(choices, list) or len(choices) < 2:
            raise InputError(f"{path}, row {row_number}: needs 'question' and a list of >= 2 'choices'")
        gold = answer if isinstance(answer, int) else choices.index(answer) if answer in choices else None
        if gold is None or not 0 <= gold < len(choices):
            raise InputError(f"{path}, row {row_number}: 'answer' {answer!r} is not a choice or its index")
        items.append({"task": CHOICE, "index": len(items), "prompt_instruction": row["question"],
                      "prompt_input": row.get("input") or "", "options": [str(c) for c in choices],
                      "gold_index": gold, "gold": str(choices[gold]), "entry": None})
    return items


def _load_items(args) -> list[dict]:
    from jtranspeft.data.config import RG_DEFAULT_EVAL_SIZE
    from jtranspeft.data.sources import RG_EVAL_SEED_OFFSET
    from jtranspeft.eval import scorers, tasks

    if args.task == CHOICE:
        return _load_choice(args.data, args.limit)
    if args.task.startswith("rg:"):  # the same items as the training config's eval split for this seed
        items = tasks.get_task(args.task).load(limit=args.limit or RG_DEFAULT_EVAL_SIZE,
                                               seed=args.seed + RG_EVAL_SEED_OFFSET, rg_kwargs=args.rg_kwargs)
    else:
        items = tasks.get_task(args.task).load(args.data, limit=args.limit)
    if args.scoring == "loglik":  # commonsense: every label of the task is an option
        labels = scorers.COMMONSENSE_LABELS[args.task]
        for item in items:
            item["options"] = [COMMONSENSE_ANSWER.format(label=label) for label in labels]
            item["gold_index"] = labels.index(item["gold"])
    return items


def build_prompt(item: dict, template: str, tokenizer=None, suffix: str = "") -> str:
    """The prompt of an eval item: the training template (`prompts.render`) plus an optional suffix."""
    from jtranspeft.data.prompts import render

    record = {"instruction": item["prompt_instruction"], "input": item["prompt_input"], "output": ""}
    return render(record, template, tokenizer)[0] + suffix


def extract_answer(task: str, text: str) -> str | None:
    """The answer the task's scorer reads from a generation (reported in predictions.jsonl)."""
    from jtranspeft.eval import scorers

    if task == "gsm8k":
        return scorers.extract_gsm8k_prediction(text)
    if task == "math":
        return scorers.extract_math_prediction(text)
    if task in scorers.COMMONSENSE_LABELS:
        return scorers.extract_commonsense_label(text, task)
    return scorers.extract_reasoning_gym_answer(text)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)


def _score_by_generation(args, base, lora, items, prompts) -> tuple[list[dict], dict]:
    import jtranspeft as jt
    from jtranspeft.eval import tasks

    task = tasks.get_task(args.task)
    with _progress(len(items), args.task) as bar:
        start = time.perf_counter()
        texts, ids = jt.generate(base, prompts, lora, max_new_tokens=args.max_new_tokens, stop=STOP_STRINGS,
                                 batch_size=args.batch_size, on_batch_done=bar.update, return_ids=True,
                                 add_special_tokens=args.template != "chat")
        seconds = time.perf_counter() - start
    rows = [{"index": item["index"], "prompt": prompt, "output": text, "extracted": extract_answer(args.task, text),
             "gold": item["gold"], "correct": bool(task.score(text, item)), "new_tokens": len(new)}
            for item, prompt, text, new in zip(items, prompts, texts, ids)]
    new_tokens = sum(len(new) for new in ids)
    return rows, {"seconds": seconds, "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds,
                  "note": "wall time of all batches, compilation included"}


def _score_by_loglik(args, base, lora, items, prompts) -> tuple[list[dict], dict]:
    from jtranspeft.eval.loglik import continuation_logprobs

    tok = base.tokenizer
    rows, start = [], time.perf_counter()
    with _progress(len(items), args.task) as bar:
        for first in range(0, len(items), args.batch_size):
            chunk = list(zip(items[first:first + args.batch_size], prompts[first:first + args.batch_size]))
            pairs = [(tok(prompt, add_special_tokens=args.template != "chat")["input_ids"],
                      tok(option, add_special_tokens=False)["input_ids"])
                     for item, prompt in chunk for option in item["options"]]
            scores = iter(continuation_logprobs(base, pairs, lora, args.batch_size))
            for item, prompt in chunk:
                item_scores = [next(scores) for _ in item["options"]]
                best = max(range(len(item_scores)), key=item_scores.__getitem__)
                rows.append({"index": item["index"], "prompt": prompt, "output": item["options"][best],
                             "extracted": item["options"][best], "gold": item["options"][item["gold_index"]],
                             "correct": best == item["gold_index"], "option_logprobs": item_scores})
            bar.update(len(chunk))
    return rows, {"seconds": time.perf_counter() - start}


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def run(args, base=None) -> dict:
    """Evaluate as the parsed ``args`` say; writes the output files and returns the results dict.

    ``base``: the already loaded `Base` that ``args.base`` names (callers scoring many adapters on one
    base load it once).
    """
    import jtranspeft as jt
    from jtranspeft.eval import scorers

    started = time.perf_counter()
    name = args.task or "perplexity"
    out = Path(args.out or f"eval-{name.replace(':', '_')}")
    items = None if args.perplexity else _load_items(args)  # before the model: bad data fails fast
    if items == []:
        raise InputError(f"task {args.task!r}: no items to evaluate")
    base = base if base is not None else jt.load_base(args.base, dtype=args.dtype)
    if base.tokenizer is None:
        raise InputError(f"--base {args.base}: no tokenizer files; evaluation needs one")
    lora = jt.load_peft(args.adapter, base) if args.adapter else None
    if lora is not None and args.merge:
        base, lora = jt.merge_lora(base, lora), None
    settings = {"base": args.base, "adapter": args.adapter, "merge": args.merge, "dtype": args.dtype,
                "batch_size": args.batch_size, "device": _device()}
    if args.perplexity:
        from jtranspeft.eval.loglik import perplexity

        text = Path(args.perplexity).read_text(encoding="utf-8")
        result = perplexity(base, text, lora, window=args.window, batch_size=args.batch_size)
        results = {"task": "perplexity", **result, "settings": {**settings, "file": args.perplexity,
                                                                "window": args.window}}
        results["wall_time_s"] = time.perf_counter() - started
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "results.json", results)
        return results

    suffix = THINK_SUFFIX if args.task in ("gsm8k", "math") else ""
    prompts = [build_prompt(item, args.template, base.tokenizer, suffix) for item in items]
    settings.update(task=args.task, data=args.data, limit=args.limit, seed=args.seed, rg_kwargs=args.rg_kwargs,
                    template=args.template,
                    prompt_suffix=suffix, scoring=args.scoring)
    if args.scoring == "loglik":
        rows, timing = _score_by_loglik(args, base, lora, items, prompts)
    else:
        settings.update(decoding="greedy", max_new_tokens=args.max_new_tokens, stop=list(STOP_STRINGS))
        rows, timing = _score_by_generation(args, base, lora, items, prompts)
    correct = [row["correct"] for row in rows]
    no_answer = sum(1 for row in rows if row["extracted"] is None)
    results = {"task": args.task, **scorers.accuracy_with_ci(correct),
               "counts": {"total": len(rows), "correct": sum(correct), "wrong": len(rows) - sum(correct),
                          "no_answer": no_answer},
               "settings": settings, "timing": timing, "wall_time_s": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "results.json", results)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return results


def _device() -> str:
    import jax

    device = jax.devices()[0]
    return f"{device.platform}: {device.device_kind}"


def _resolve_defaults(args) -> None:
    """Fill the task-dependent defaults: scoring, generation budget and prompt template."""
    from jtranspeft.eval.scorers import COMMONSENSE_LABELS

    commonsense = args.task in COMMONSENSE_LABELS
    args.scoring = args.scoring or ("loglik" if args.task == CHOICE else "generate")
    if args.task and args.max_new_tokens is None:
        args.max_new_tokens = MAX_NEW_TOKENS.get(args.task, 32 if commonsense else 512)
    args.template = args.template or ("commonsense" if commonsense else "alpaca")


def run_argv(argv: list[str], base=None) -> dict:
    """Parse command-line ``argv``, check the inputs and `run` (library form of the CLI; raises InputError)."""
    args = build_parser().parse_args(argv)
    for flag in ("limit", "batch_size", "max_new_tokens", "window"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    _resolve_defaults(args)
    _check_inputs(args)
    return run(args, base)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    try:
        results = run_argv(sys.argv[1:] if argv is None else argv)
    except (InputError, FileNotFoundError, ValueError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    summary = {k: results[k] for k in ("task", "accuracy", "ci_low", "ci_high", "n", "perplexity") if k in results}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
