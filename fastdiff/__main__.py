"""`python -m fastdiff ...` = the `fastdiff` command."""
import sys

from fastdiff.cli import main

if __name__ == "__main__":
    sys.exit(main())
