import pytest
import torch
from hypothesis import settings

settings.register_profile("polar", deadline=None, derandomize=False, print_blob=True)
settings.load_profile("polar")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts carried between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
