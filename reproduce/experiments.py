"""``python -m reproduce.experiments``: entry point; the code is in ``reproduce.pipeline.experiments``."""
import sys

from reproduce.pipeline.experiments import main

if __name__ == "__main__":
    sys.exit(main())
