"""``python -m jtranspeft.evolve``: runs `jtranspeft.cli.evolve`.

Imported, it runs nothing (`jtranspeft.evolve` stays the library function, see `jtranspeft.__init__`).
"""

if __name__ == "__main__":
    import sys

    from jtranspeft.cli.evolve import main

    sys.exit(main())
