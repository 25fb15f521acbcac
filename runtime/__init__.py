"""modelsplit's runtime: a threaded, stream-based pipeline over devices."""

from __future__ import annotations

from runtime.pipeline import Pipeline

__all__ = ["Pipeline"]
