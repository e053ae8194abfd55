"""``python -m jtranspeft.train``: runs `jtranspeft.cli.train`.

Imported, it runs nothing (`jtranspeft.train` stays the library function, see `jtranspeft.__init__`).
"""

if __name__ == "__main__":
    import sys

    from jtranspeft.cli.train import main

    sys.exit(main())
