"""``python -m reproduce.tables``: entry point; the code is in ``reproduce.report.tables``."""
import sys

from reproduce.report.tables import main

if __name__ == "__main__":
    sys.exit(main())
