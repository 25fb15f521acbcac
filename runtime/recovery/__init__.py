"""Fault recovery: what counts as a lost device (`faults`), and resuming a call (`resume`)."""
