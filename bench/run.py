"""`make bench`: ctstream's datapath benchmark (see bench/README.md)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from datapath import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
