"""The example models (`partitioner.examples`): ``modelsplit plan modelsplit.examples:mlp``."""

from partitioner.examples import *  # noqa: F403
from partitioner.examples import __all__  # noqa: F401
