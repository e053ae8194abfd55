"""``python -m jtranspeft.evaluate``: runs `jtranspeft.cli.evaluate`.

Imported, it runs nothing (`jtranspeft.evaluate` stays the library function, see `jtranspeft.__init__`).
"""

if __name__ == "__main__":
    import sys

    from jtranspeft.cli.evaluate import main

    sys.exit(main())
