"""``python -m reproduce.synth``: entry point; the code is in ``reproduce.data.synth``."""
import sys

from reproduce.data.synth import main

if __name__ == "__main__":
    sys.exit(main())
