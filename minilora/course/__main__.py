"""``python -m minilora.course build|grade|list ...``."""
import sys

from .cli import main

sys.exit(main())
