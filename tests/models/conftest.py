"""tests/models: the math runs on tiny tensors, where one intra-op thread is fastest and immune to the
oversubscription of a busy 2-core CI machine. The setting is restored after every test."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread_here(one_thread):
    """Every test of tests/models runs with tests/conftest.py's ``one_thread``."""
