"""Errors raised at the public boundary of the partitioner."""

from __future__ import annotations


class ModelSplitError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class MicroBatchError(ModelSplitError):
    """Run as micro-batches this small, the split would not be the model: ``rows`` is the
    smallest micro-batch that gave another answer; ``any_cut`` says no cut of the batch
    would (outputs that mix rows, a loss the reducer cannot rebuild): one micro-batch per
    call (``chunks=1``) is the model. A `ModelSplitter` whose ``chunks`` was not given picks
    bigger micro-batches instead of raising ([Note: choosing micro-batches])."""

    def __init__(self, message: str, rows: int, any_cut: bool = False) -> None:
        super().__init__(message)
        self.rows, self.any_cut = rows, any_cut


class TraceError(ModelSplitError):
    """The model could not be captured as a graph that reproduces its outputs."""


class InfeasiblePlanError(ModelSplitError):
    """No assignment satisfies the devices' memory limits."""


class InputError(ModelSplitError, ValueError):
    """The model itself fails on the inputs it was given (a shape or dtype mismatch)."""


class PlanError(ModelSplitError, ValueError):
    """A plan is malformed, or does not match the model it is applied to."""
