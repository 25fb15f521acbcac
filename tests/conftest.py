"""Shared test set-up: a seeded RNG per test, hypothesis profiles, the checkout on sys.path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

settings.register_profile("ci", max_examples=30, deadline=None)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
