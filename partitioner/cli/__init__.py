"""Command-line interface: ``modelsplit plan | show | run | compare``."""

from partitioner.cli.app import main

__all__ = ["main"]
