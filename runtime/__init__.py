"""modelsplit's runtime: a threaded, stream-based pipeline over devices."""

from __future__ import annotations

from runtime.errors import StageError
from runtime.pipeline import Pipeline, RunRecord
from runtime.schedule import clock_cycles, format_schedule

__all__ = ["Pipeline", "RunRecord", "StageError", "clock_cycles", "format_schedule"]
