"""`python -m npdraw ...`: the npdraw command line (npdraw/cli.py)."""
from npdraw.cli import main

if __name__ == "__main__":
    main()
