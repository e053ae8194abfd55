"""``python -m jtranspeft.migrate``: runs `jtranspeft.cli.migrate`.

Imported, it runs nothing (`jtranspeft.migrate` stays the library function, see `jtranspeft.__init__`).
"""

if __name__ == "__main__":
    import sys

    from jtranspeft.cli.migrate import main

    sys.exit(main())
