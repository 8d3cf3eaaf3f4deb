"""``python -m mag``: the ``mag`` command line without installing the package (``PYTHONPATH=.``)."""

import sys

from mag.cli import main

sys.exit(main())
