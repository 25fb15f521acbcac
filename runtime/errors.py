"""Errors raised by the pipeline runtime."""

from __future__ import annotations

from typing import Any

__all__ = ["StageError"]


class StageError(RuntimeError):
    """A stage raised while running a micro-batch.

    Raised ``from`` the original exception, so the traceback shows both. ``original`` is
    the exception the stage raised (``isinstance(err.original, torch.cuda.OutOfMemoryError)``),
    ``stage``/``device``/``microbatch`` say where, and ``completed`` maps the micro-batches
    whose last stage had finished to their outputs, for a caller that wants to retry only
    the rest; ``sizes`` are the call's micro-batch sizes.
    """

    def __init__(
        self,
        stage: int,
        device: str,
        microbatch: int,
        original: BaseException,
        completed: dict[int, Any] | None = None,
    ) -> None:
        self.stage = stage
        self.device = device
        self.microbatch = microbatch
        self.original = original
        self.completed: dict[int, Any] = dict(completed or {})
        #: the micro-batch sizes of the call that failed (set by `Pipeline.run_call`)
        self.sizes: list[int] = []
        super().__init__(
            f"stage {stage} on {device} failed on micro-batch {microbatch}: "
            f"{type(original).__name__}: {original}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stage, self.device, self.microbatch, self.original))
