"""The trace pass: capture a model as a torch.fx graph that reproduces its outputs.

`tracer` (torch.fx, torch.export fallback), `binding` (how the graph's inputs and outputs
map onto the user's call), `inplace` (in-place ops made data flow), `checks` (the traced
graph checked against the model).
"""

from partitioner.capture.tracer import input_signature, trace

__all__ = ["input_signature", "trace"]
