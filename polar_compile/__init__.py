"""polar-compile: a ``torch.compile`` backend for batched LLM decoding with Polar Sparsity.

One attention site, top-down: ``backend.py`` (options -> passes -> Inductor) -> ``passes/attention.py`` (the
rewrite; sites come from ``passes/match.py``) -> ``ops.py`` (``polar::select_attention``) ->
``kernels/select_attention.py`` (the Triton kernel), with the routers from ``routers.py``, put on the model by
``state.py`` (``attach``) or given in the options.
"""

from . import export
from .backend import make_backend
from .calibrate import calibrate
from .config import PolarConfig, PolarOptionError
from .explain import ExplainReport, explain
from .mlp_routers import MlpRouters
from .routers import RouterBank, RouterBankError
from .state import attach, detach

__all__ = [
    # compile
    "PolarConfig",
    "PolarOptionError",
    "attach",
    "detach",
    "make_backend",
    # calibrate
    "calibrate",
    # routers
    "MlpRouters",
    "RouterBank",
    "RouterBankError",
    # inspect
    "ExplainReport",
    "explain",
    # deploy
    "export",
]
