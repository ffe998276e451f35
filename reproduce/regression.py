"""``python -m reproduce.regression``: entry point; the code is in ``reproduce.pipeline.regression``."""
import sys

from reproduce.pipeline.regression import main

if __name__ == "__main__":
    sys.exit(main())
