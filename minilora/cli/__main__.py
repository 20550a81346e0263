"""``python -m minilora.cli``: the same as the ``minilora`` command."""
import sys

from minilora.cli import main

sys.exit(main())
