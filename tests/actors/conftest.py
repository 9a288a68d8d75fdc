"""Fixtures for the tests of what runs on a node."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Tiny models gain nothing from threads, and on a busy 2-core box an OpenMP thread that loses its core
    # stalls every op (a 64x64 render went from 0.09 s to 2.3 s with 2 threads): render on one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
