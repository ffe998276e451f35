"""``python -m reproduce.prepare``: entry point; the code is in ``reproduce.data.prepare``."""
import sys

from reproduce.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
