"""``python -m partitioner.cli``."""

import sys

from partitioner.cli.app import main

sys.exit(main())
