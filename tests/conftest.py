"""Fixtures shared by several test files (opt-in: `pytestmark = pytest.mark.usefixtures("one_thread")`)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster (10x on a busy 2-core machine); restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
