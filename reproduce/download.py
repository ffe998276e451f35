"""``python -m reproduce.download``: entry point; the code is in ``reproduce.data.download``."""
import sys

from reproduce.data.download import main

if __name__ == "__main__":
    sys.exit(main())
