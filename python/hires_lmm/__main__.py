"""python -m hires_lmm: the hires-lmm command (info, bench, convert, generate)."""
import sys

from .cli import main

sys.exit(main())
