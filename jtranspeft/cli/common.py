"""What every jtranspeft CLI shares: logging flags, the exit-code convention, the usage name.

A CLI module parses its arguments, configures logging (`setup_logging`: ``--quiet`` shows only warnings and
errors and hides progress bars, ``--verbose`` adds debug messages), calls ONE library function with typed
arguments and prints its result. `cli_main` turns the library's errors into the exit statuses of
`jtranspeft.utils.errors` (0 ok, 1 runtime failure, 2 bad input, 3 incompatible, 143 SIGTERM) with a
one-line ``error: ...`` on stderr instead of a traceback. CLI modules import nothing heavy at module level,
so ``--help`` answers without loading JAX.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from jtranspeft.utils.config_io import parse_cli
from jtranspeft.utils.errors import EXIT_BAD_INPUT, RunStopped

LOGGING_SWITCHES = {"--quiet": "print only warnings and errors (no progress bars)",
                    "--verbose": "also print debug messages"}
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


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Log ``jtranspeft`` messages to stderr: INFO by default, WARNING with ``quiet`` (which also hides
    progress bars, `jtranspeft.utils.progress`), DEBUG with ``verbose``."""
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


def add_logging_flags(parser) -> None:
    """Add ``--quiet`` and ``--verbose`` to an argparse parser (read them back with `setup_logging`)."""
    for flag, help_text in LOGGING_SWITCHES.items():
        parser.add_argument(flag, action="store_true", help=help_text)


def parse_config_cli(argv: Sequence[str] | None, description: str, examples: Sequence[str], prog: str,
                     switches: dict[str, str] | None = None) -> tuple:
    """``--config FILE [key=value ...]`` plus ``switches`` and the logging flags; logging is set up.

    Returns (config path, overrides, {switch: bool}) as `jtranspeft.utils.config_io.parse_cli` does.
    """
    path, overrides, flags = parse_cli(argv, description, examples, prog, {**(switches or {}), **LOGGING_SWITCHES})
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
    Python exits with 1). Entry points run ``sys.exit(main())``."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
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
