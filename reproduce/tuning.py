"""``python -m reproduce.tuning``: entry point; the code is in ``reproduce.pipeline.tuning``."""
import sys

from reproduce.pipeline.tuning import main

if __name__ == "__main__":
    sys.exit(main())
