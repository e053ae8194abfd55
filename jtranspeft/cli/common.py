"""What every jtranspeft CLI shares: logging flags, the compilation cache, the exit-code convention, the usage name.

A CLI module parses its arguments, configures logging (`setup_logging`: ``--quiet`` shows only warnings and
errors and hides progress bars, ``--verbose`` adds debug messages) and JAX's persistent compilation cache
(`setup_compile_cache`, on unless ``--no-compile-cache`` or ``JTRANSPEFT_COMPILE_CACHE=0``: a rerun, a
resumed run or the next evaluation loads the compiled programs instead of compiling them again), calls ONE
library function with typed arguments and prints its result. `cli_main` turns the library's errors into the exit statuses of
`jtranspeft.utils.errors` (0 ok, 1 runtime failure, 2 bad input, 3 incompatible, 143 SIGTERM) with a
one-line ``error: ...`` on stderr instead of a traceback. CLI modules import nothing heavy at module level,
so ``--help`` answers without loading JAX.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from jtranspeft.utils import host_memory
from jtranspeft.utils.config_io import parse_cli
from jtranspeft.utils.errors import EXIT_BAD_INPUT, RunStopped

COMPILE_CACHE_ENV = "JTRANSPEFT_COMPILE_CACHE"  # 0 / false / off: no persistent compilation cache
COMPILE_CACHE_FLAG = "--no-compile-cache"
LOGGING_SWITCHES = {"--quiet": "print only warnings and errors (no progress bars)",
                    "--verbose": "also print debug messages",
                    COMPILE_CACHE_FLAG: f"do not read or write compiled programs in $JTRANSPEFT_CACHE/jax "
                                        f"(default ~/.cache/jtranspeft/jax; same as {COMPILE_CACHE_ENV}=0)"}
# Errors that mean "the input is bad" (the message names the file, field or value): exit status 2.
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                    ConnectionError, json.JSONDecodeError)


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at the time of each message."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def compile_cache_dir() -> Path | None:
    """Where the CLIs keep JAX's compiled programs: ``$JTRANSPEFT_CACHE/jax`` (default ~/.cache/jtranspeft/jax),
    or None when ``JTRANSPEFT_COMPILE_CACHE`` is 0 / false / off (``--no-compile-cache`` sets it)."""
    from jtranspeft.checkpoints.assets import cache_root

    if os.environ.get(COMPILE_CACHE_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    return cache_root() / "jax"


def setup_compile_cache(min_compile_secs: float = 1.0) -> Path | None:
    """Turn on JAX's persistent compilation cache in `compile_cache_dir` (unless it is off, or
    ``JAX_COMPILATION_CACHE_DIR`` already names a directory: that one is kept) and return the directory in use.

    Programs that compiled in at least ``min_compile_secs`` are written, whatever their size (a train step
    compiles in 10-20 s on a CPU; reading a program back costs about as much as compiling a trivial one).
    Call it before the first compilation: JAX opens the cache once per process. The cache is trusted code
    (JAX's warning): keep it in a directory only you can write."""
    import jax

    directory = jax.config.jax_compilation_cache_dir or compile_cache_dir()
    if directory is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return Path(directory)


def turn_off_compile_cache() -> None:
    """What ``--no-compile-cache`` does: ``JTRANSPEFT_COMPILE_CACHE=0`` for this process and its children."""
    os.environ[COMPILE_CACHE_ENV] = "0"


class _NoCompileCache(argparse.Action):
    """``--no-compile-cache``: sets ``JTRANSPEFT_COMPILE_CACHE=0`` as soon as it is parsed (`setup_logging`
    then leaves the cache off), so every CLI gets the switch from `add_logging_flags` alone."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        turn_off_compile_cache()
        setattr(namespace, self.dest, True)


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Log ``jtranspeft`` messages to stderr: INFO by default, WARNING with ``quiet`` (which also hides
    progress bars, `jtranspeft.utils.progress`), DEBUG with ``verbose``; then `setup_compile_cache` (every CLI
    calls this once, after parsing its arguments and before any compilation)."""
    # transformers' advice "PyTorch was not found. Models won't be available" is for its own models; jtranspeft
    # uses only its tokenizers and configs, so the advice would only mislead (set before transformers loads).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logger = logging.getLogger("jtranspeft")
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.debug(host_memory.describe())
    setup_compile_cache()


def add_logging_flags(parser) -> None:
    """Add ``--quiet``, ``--verbose`` and ``--no-compile-cache`` to an argparse parser (read them back with
    `setup_logging`)."""
    for flag, help_text in LOGGING_SWITCHES.items():
        parser.add_argument(flag, action=_NoCompileCache if flag == COMPILE_CACHE_FLAG else "store_true",
                            help=help_text)


def parse_config_cli(argv: Sequence[str] | None, description: str, examples: Sequence[str], prog: str,
                     switches: dict[str, str] | None = None) -> tuple:
    """``--config FILE [key=value ...]`` plus ``switches`` and the logging flags; logging is set up.

    Returns (config path, overrides, {switch: bool}) as `jtranspeft.utils.config_io.parse_cli` does.
    """
    path, overrides, flags = parse_cli(argv, description, examples, prog, {**(switches or {}), **LOGGING_SWITCHES})
    if flags.pop("no_compile_cache"):
        turn_off_compile_cache()
    setup_logging(flags.pop("quiet"), flags.pop("verbose"))
    return path, overrides, flags


def run_config_job(argv: Sequence[str] | None, *, prog: str, description: str, examples: str, config: str,
                   job: str, then: Callable[[object, dict], None] | None = None) -> int:
    """A config-driven job's CLI: parse ``--config FILE key=value ...``, build the typed config, run the job,
    print its summary as JSON, then call ``then(config, summary)`` if given (e.g. to print the next step).
    ``config`` / ``job`` are "module:name" of the config class and the function, imported only after the
    arguments are parsed (``--help`` stays fast)."""
    import importlib

    from jtranspeft.utils.config_io import load_config

    config_path, overrides, _ = parse_config_cli(argv, description, examples.splitlines(), prog)
    (config_module, config_name), (job_module, job_name) = config.split(":"), job.split(":")
    config_type = getattr(importlib.import_module(config_module), config_name)
    cfg = load_config(config_type, [config_path], overrides)
    summary = getattr(importlib.import_module(job_module), job_name)(cfg)
    print(json.dumps(summary, indent=2))
    if then is not None:
        then(cfg, summary)
    return 0


def cli_main(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a CLI ``main`` returning its exit status: bad input prints ``error: ...`` and returns 2,
    `RunStopped` prints its message and returns its status. Other exceptions keep their traceback (a bug;
    Python exits with 1). Entry points run ``sys.exit(main())``: called so, with no arguments, by ``python -m
    jtranspeft.<job>`` or ``jtranspeft-<job>`` (not for ``--help``), a CLI first re-executes itself with huge
    pages for the host allocator (`jtranspeft.utils.host_memory.reexec_with_huge_pages`)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        if not args and not kwargs and not {"-h", "--help"} & set(sys.argv[1:]):
            host_memory.reexec_with_huge_pages()
        try:
            return main(*args, **kwargs)
        except RunStopped as stop:
            print(f"error: {stop}", file=sys.stderr)
            return stop.exit_code
        except BAD_INPUT_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return wrapper


def usage_name(tool: str) -> str:
    """The command the user typed to run ``tool``, for its usage line: the console script's name
    (``jtranspeft-train``) when run as one, else ``python -m jtranspeft.train``."""
    script = f"jtranspeft-{tool}"
    return script if Path(sys.argv[0]).stem == script else f"python -m jtranspeft.{tool}"
