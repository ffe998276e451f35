"""``python -m reproduce.train``: entry point; the code is in ``reproduce.training.train``."""
import sys

from reproduce.training.train import main

if __name__ == "__main__":
    sys.exit(main())
