#!/usr/bin/env python
"""`python cli.py ...` from a checkout: the npdraw command line (npdraw/cli.py), the same
as the installed `npdraw ...` and `python -m npdraw ...`."""
try:
    from npdraw.cli import cli, main  # noqa: F401
except KeyboardInterrupt:   # Ctrl-C while NumPy and click load: 130 and one word, as later
    import sys
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None

if __name__ == "__main__":
    main()
