"""``python -m jtranspeft.export``: runs `jtranspeft.cli.export`.

Imported, it runs nothing; the library function is `jtranspeft.export_gguf`.
"""

if __name__ == "__main__":
    import sys

    from jtranspeft.cli.export import main

    sys.exit(main())
