"""Where a run's per-step metrics go: ``metrics.jsonl`` always, TensorBoard event files optionally.

`MetricsLog` appends one JSON line per logged step (on object stores, which cannot append, it rewrites the
object at each flush). With ``train.tensorboard: true`` the numeric fields of every row also go to
``<output_dir>/tensorboard`` through tensorboardX (``pip install "jtranspeft[tensorboard]"``), one scalar
per field under ``train/<field>`` at the row's step, for ``tensorboard --logdir <output_dir>``.
"""

from __future__ import annotations

import json
import numbers

from etils import epath

from jtranspeft.utils.errors import InputError


class MetricsLog:
    """``metrics.jsonl`` of a run, plus TensorBoard events when ``tensorboard`` is set."""

    def __init__(self, out: epath.Path, tensorboard: bool = False):
        self.path = out / "metrics.jsonl"
        self.remote = "://" in str(self.path)
        self.lines = self.path.read_text().splitlines(keepends=True) if self.remote and self.path.exists() else []
        self._file = None if self.remote else open(self.path, "a")
        self._tensorboard = _tensorboard_writer(out) if tensorboard else None

    def write(self, row: dict) -> None:
        """Add one row (a dict with a ``step`` field)."""
        line = json.dumps(row) + "\n"
        if self.remote:
            self.lines.append(line)
        else:
            self._file.write(line)
            self._file.flush()
        if self._tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"train/{key}", value, row["step"])

    def flush(self) -> None:
        """Make the rows written so far durable (remote: rewrite the object)."""
        if self.remote:
            self.path.write_text("".join(self.lines))
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        """Flush and close."""
        self.flush()
        if self._file is not None:
            self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _tensorboard_writer(out: epath.Path):
    if "://" in str(out):
        raise InputError(f"train.tensorboard=true needs a local output_dir, got {out} "
                         "(point TensorBoard at metrics.jsonl's directory on a local copy instead)")
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise InputError('train.tensorboard=true needs tensorboardX: pip install "jtranspeft[tensorboard]"') from None
    return SummaryWriter(logdir=str(out / "tensorboard"))
