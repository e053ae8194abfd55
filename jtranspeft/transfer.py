"""``python -m jtranspeft.transfer``: runs `jtranspeft.cli.transfer`.

Imported, it runs nothing (`jtranspeft.transfer` stays the library function, see `jtranspeft.__init__`).
"""

if __name__ == "__main__":
    import sys

    from jtranspeft.cli.transfer import main

    sys.exit(main())
