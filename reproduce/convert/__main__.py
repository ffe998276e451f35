"""``python -m reproduce.convert HF_DIR --out model.pth [--num-classes N]`` (see cli.py)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
