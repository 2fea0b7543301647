"""The benchmark's --quick mode runs in CI: figures are not asserted, only that they are sane
(finite, positive, errors within the bounds the accuracy tests use)."""

import json
import math

from bench import first_bench
from bench.results_io import RESULTS
from tests.test_end_to_end import LOGIT_BOUND


def test_first_bench_quick_runs_and_is_sane():
    assert first_bench.main(["--quick"]) == 0
    data = json.loads((RESULTS / "first_bench_quick.json").read_text())
    results = data["results"]
    assert {"tutorial_default_threads", "heinfer_tutorial_net", "heinfer_cryptonets"} <= set(
        results)
    for key, r in results.items():
        assert math.isfinite(r["server_ms_mean"]) and r["server_ms_mean"] > 0, key
        assert r["upload_bytes"] > 0 and r["eval_key_bytes"] > 0, key
        if key.startswith("heinfer"):
            assert r["max_logit_error"] < LOGIT_BOUND and r["agreement"] == 1.0, key
    # the comparison the first benchmark exists for, on this very run
    tut, ours = results["tutorial_default_threads"], results["heinfer_tutorial_net"]
    assert ours["upload_bytes"] <= tut["upload_bytes"]
    assert ours["eval_key_bytes"] <= tut["eval_key_bytes"]
