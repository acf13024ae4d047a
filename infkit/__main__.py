"""``python -m infkit report`` — the same as the ``infkit`` command."""

import sys

from infkit.cli import main

sys.exit(main())
