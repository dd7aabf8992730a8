"""Fixtures shared by several test files (opt-in: `pytestmark = pytest.mark.usefixtures("one_thread")`), and the
hypothesis profile every test runs under.

Hypothesis profile (issue 25 item 11): without `derandomize`, a property test's examples come from hypothesis'
own random stream, which every earlier test advances: a check drew other examples in the whole suite than in its
file alone (test_sft.py::test_masker_properties caught the SFT boundary bug in one and missed it in the other).
With `derandomize=True` each test's examples are a function of the test itself, so `make test`, one file, one
node id and `make mutants` all draw the same examples. Explicit `@settings(...)` on a test inherit it (a settings
object takes the loaded profile's values for whatever it does not name). `database=None`: no examples replayed
from an earlier run either. parity's harness sets the same on every row (parity/harness.py).
"""

import pytest
import torch
from hypothesis import settings

settings.register_profile("minillm", derandomize=True, database=None, deadline=None, print_blob=False)
settings.load_profile("minillm")


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster (10x on a busy 2-core machine); restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
