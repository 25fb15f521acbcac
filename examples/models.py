"""The example models, for file-path specs such as ``modelsplit plan examples/models.py:mlp``.

They live in the installed package `partitioner.examples` (also `modelsplit.examples`), so a
pip user loads them from any folder as ``modelsplit.examples:mlp``.
"""

from partitioner.examples import *  # noqa: F403
from partitioner.examples import __all__  # noqa: F401
