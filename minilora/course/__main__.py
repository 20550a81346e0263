"""``python -m minilora.course ASSIGNMENT FILE``: the same as ``minilora grade``."""
import sys

from minilora.course.grade import main

sys.exit(main())
