"""Entry point: ``python -m simulations --data-dir DIR``."""

from __future__ import annotations

import sys

from simulations.scripted import main

if __name__ == "__main__":
    sys.exit(main())
