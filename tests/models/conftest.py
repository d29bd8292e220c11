"""tests/models: the math runs on tiny tensors, where one intra-op thread is fastest and immune to the
oversubscription of a busy 2-core CI machine. The setting is restored after every test."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
