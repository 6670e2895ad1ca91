"""Hypothesis example budgets: each test's CI budget, scaled up for a thorough run by hand.

``HYPOTHESIS_PROFILE=polar-thorough python -m pytest`` multiplies every budget by :data:`THOROUGH_FACTOR` (and CI's
profile is derandomized, see ``conftest.py``).
"""

import os

THOROUGH_FACTOR = 20


def examples(ci_budget: int) -> int:
    """``ci_budget`` examples, or :data:`THOROUGH_FACTOR` times as many under the thorough profile."""
    thorough = os.environ.get("HYPOTHESIS_PROFILE") == "polar-thorough"
    return ci_budget * THOROUGH_FACTOR if thorough else ci_budget
