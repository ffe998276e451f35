"""``python -m reproduce.claim``: entry point; the code is in ``reproduce.report.claim``."""
import sys

from reproduce.report.claim import main

if __name__ == "__main__":
    sys.exit(main())
