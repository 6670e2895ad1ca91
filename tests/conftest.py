import os

import pytest
import torch
from hypothesis import settings

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before anything imports triton
# (torch._inductor does), whatever order pytest collects the test files in.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI (CI=true) runs a fixed, database-free profile so that a red CI is reproducible; by hand,
# `HYPOTHESIS_PROFILE=polar-thorough pytest` draws many more examples (tests/budget.py).
settings.register_profile("polar", deadline=None, derandomize=False, print_blob=True)
settings.register_profile("polar-ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("polar-thorough", deadline=None, derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "polar-ci" if os.environ.get("CI") else "polar"))


# torch._dynamo.reset() iterates its registered backends and resets each; Inductor's reset may import
# torch._inductor.select_algorithm for the first time, whose module-level @torch.compiler.disable registers another
# backend during that iteration ("dictionary changed size during iteration"). Import it once up front.
import torch._inductor.select_algorithm  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts carried between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
