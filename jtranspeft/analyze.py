"""``python -m jtranspeft.analyze``: runs `jtranspeft.cli.analyze`.

Imported, it runs nothing (`jtranspeft.analyze` stays the library function, see `jtranspeft.__init__`).
"""

if __name__ == "__main__":
    import sys

    from jtranspeft.cli.analyze import main

    sys.exit(main())
