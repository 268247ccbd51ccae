"""``python -m sslam ...`` is the ``sslam`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # not when merely imported (e.g. by a walk over the submodules)
    sys.exit(main())
