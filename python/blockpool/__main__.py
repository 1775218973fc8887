"""``python -m blockpool``: the same as the ``blockpool`` command."""

import sys

from blockpool.cli import main

sys.exit(main())
