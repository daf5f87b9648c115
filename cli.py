#!/usr/bin/env python
"""`python cli.py ...` from a checkout: the npdraw command line (npdraw/cli.py), the same
as the installed `npdraw ...` and `python -m npdraw ...`."""
from npdraw.cli import cli, main  # noqa: F401

if __name__ == "__main__":
    main()
