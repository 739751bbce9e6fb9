"""``python -m imserver``: the same as the ``imserver`` command."""

from imserver.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
