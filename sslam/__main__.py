"""``python -m sslam ...`` is the ``sslam`` command."""

import sys

from .cli import main

sys.exit(main())
