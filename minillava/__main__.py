"""`python -m minillava ...`: the same as the `minillava` command."""

import sys

from minillava.cli import main

sys.exit(main())
