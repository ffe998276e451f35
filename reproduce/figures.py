"""``python -m reproduce.figures``: entry point; the code is in ``reproduce.report.figures``."""
import sys

from reproduce.report.figures import main

if __name__ == "__main__":
    sys.exit(main())
