"""An infeasible Galois key budget names the smallest budget that works for the plan."""

import re

import numpy as np
import pytest

from heinfer.errors import KeyBudgetError
from heinfer_packing.keys import apply_key_budget, smallest_key_budget
from heinfer_packing.lower import lower
from tests.conftest import small_params
from tests.test_lowering import small_cnn


def test_infeasible_budget_suggests_the_smallest_that_works():
    plan = lower(small_cnn(np.random.default_rng(1234)), small_params(5), first_conv="rotation")
    steps = sorted({s for s, _ in plan.rotation_counts()})
    least = smallest_key_budget(plan, 0)
    assert 1 <= least < len(steps)
    assert len(apply_key_budget(plan, least).key_budget["steps"]) <= least  # it works
    with pytest.raises(KeyBudgetError):
        plan.with_key_budget(least - 1)  # and one fewer does not
    for budget in (0, least - 1):
        with pytest.raises(KeyBudgetError) as e:
            apply_key_budget(plan, budget)
        assert re.search(rf"smallest budget that works for this plan is {least} Galois keys "
                         rf"\(--max-keys {least}\)", str(e.value))
    sizes = {"relin_key_bytes": 2_000_000, "galois_key_bytes": 1_000_000}
    with pytest.raises(KeyBudgetError, match=rf"about {2 + least}\.0 MB.*--max-key-mb"):
        apply_key_budget(plan, max_key_mb=2.5, calibration={"sizes": sizes, "ms": {}})
