"""Kernels launch here as the ``polar::`` ops launch them when they run: straight to Triton, not through torch's
``wrap_triton`` tracing wrapper (on Hopper, that is with programmatic dependent launch: ``kernels.dependent_launch``)."""

import pytest
from torch._library.triton import set_wrap_triton_enabled


@pytest.fixture(autouse=True)
def launched_as_the_ops_launch():
    with set_wrap_triton_enabled(False):
        yield
