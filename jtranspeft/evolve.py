"""``python -m jtranspeft.evolve``: runs `jtranspeft.cli.evolve`; imported, calls like the library function `jtranspeft.evolve`."""

from jtranspeft.cli.common import shim

shim(__name__)
