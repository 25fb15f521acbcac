"""Errors raised at the public boundary of the partitioner."""

from __future__ import annotations


class ModelSplitError(Exception):
    """Base class of every error this toolkit raises on purpose."""


class TraceError(ModelSplitError):
    """The model could not be captured as a graph that reproduces its outputs."""


class InfeasiblePlanError(ModelSplitError):
    """No assignment satisfies the devices' memory limits."""


class InputError(ModelSplitError, ValueError):
    """The model itself fails on the inputs it was given (a shape or dtype mismatch)."""


class PlanError(ModelSplitError, ValueError):
    """A plan is malformed, or does not match the model it is applied to."""
