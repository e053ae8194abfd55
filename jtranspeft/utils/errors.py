"""The errors jtranspeft raises on purpose, and the exit status each gives a command-line tool.

Every CLI (`jtranspeft.cli`) exits with one convention:

| status | meaning |
|---|---|
| 0 | success |
| 1 | runtime failure: a run stopped on a non-finite loss (last good checkpoint kept), or a bug (traceback) |
| 2 | bad input: a config key or value, an argument, a missing / unreadable / malformed file (`InputError`, and
      the ``ValueError`` / ``FileNotFoundError`` family the readers raise with the culprit named) |
| 3 | incompatible: an adapter that cannot be mapped onto the given base (`jtranspeft.transfer`, `jtranspeft.migrate`) |
| 4 | needs work: `jtranspeft.migrate` found adapters no rung brought to the fidelity threshold ("retrain") |
| 143 | stopped by SIGTERM after writing a checkpoint (128 + 15); rerun the command to resume |
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INCOMPATIBLE, EXIT_SIGTERM = 0, 1, 2, 3, 143
EXIT_RETRAIN = 4


class InputError(ValueError):
    """Bad input (a file, field, value or argument); the message names the culprit. CLIs exit with 2."""


class FileFormatError(InputError):
    """A file that cannot be used as it is: names the file, the field or tensor, and what was expected.

    The message reads "<file>: <field> <problem>", e.g. "config.json: field 'vocab_size' must be an integer
    >= 1, got str 'many'" or "model.safetensors: tensor 'lm_head.weight' holds NaN or infinite values".
    """

    def __init__(self, path, problem: str, field: str | None = None):
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: " + (f"{field} " if field else "") + problem)


class RunStopped(RuntimeError):
    """A run that ended early on purpose; ``exit_code`` is what the CLI returns (1, 2 or 143)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
