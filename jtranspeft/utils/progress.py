"""Progress bars that follow the ``jtranspeft`` logger: hidden when it is set above INFO (``--quiet``).

Every long loop in jtranspeft (training steps, evaluation items, analysis passes) draws its bar through
`progress_bar`, on stderr. A CLI's ``--quiet`` sets the ``jtranspeft`` logger to WARNING, which also hides
every bar; a library user does the same with ``logging.getLogger("jtranspeft").setLevel(logging.WARNING)``.
With the logger's level unset (a plain library import) bars are shown.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

_LOGGER = logging.getLogger("jtranspeft")


def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr (``kwargs`` as tqdm's), disabled when ``enabled`` is False or the
    ``jtranspeft`` logger's level is set above INFO."""
    show = enabled and _LOGGER.level <= logging.INFO  # NOTSET (0) when nobody configured it
    return tqdm(iterable, disable=not show, file=sys.stderr, dynamic_ncols=True, **kwargs)
