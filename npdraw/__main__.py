"""`python -m npdraw ...`: the npdraw command line (npdraw/cli.py)."""
try:
    from npdraw.cli import main
except KeyboardInterrupt:   # Ctrl-C while click loads: 130 and one word, as later
    import sys
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None

if __name__ == "__main__":
    main()
