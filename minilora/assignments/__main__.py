"""``python -m minilora.assignments build|grade|list ...``."""
import sys

from .cli import main

sys.exit(main())
