"""``python -m jtranspeft.train``: runs `jtranspeft.cli.train`; imported, calls like the library function `jtranspeft.train`."""

from jtranspeft.cli.common import shim

shim(__name__)
