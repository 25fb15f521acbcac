"""``python -m runtime.distributed``: one process per stage, launched by torchrun."""

import sys

from runtime.distributed.launch import main

sys.exit(main())
