"""``python -m modelsplit``: the ``modelsplit`` command line."""

import sys

from partitioner.cli.app import main

sys.exit(main())
