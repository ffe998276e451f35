"""``python -m reproduce.notebooks``: entry point; the code is in ``reproduce.report.notebooks``."""
import sys

from reproduce.report.notebooks import main

if __name__ == "__main__":
    sys.exit(main())
