"""``python -m minilora``: the same as the ``minilora`` command."""
import sys

from .cli import main

sys.exit(main())
