"""Plan choice by objective: candidates priced by a calibration, limits respected."""

import pytest

from heinfer.errors import ModelFormatError
from heinfer_models import zoo
from heinfer_packing import search


def fake_calibration(params, progress: bool = False):
    levels = range(params.top_level + 1)
    ms = {"rotate": {str(lv): 1.0 + lv for lv in levels},
          "multiply_plain": {str(lv): 0.1 + 0.05 * lv for lv in levels},
          "square": {str(lv): 1.5 + lv for lv in levels},
          "rescale": {str(lv): 0.3 for lv in levels},
          "add": {str(lv): 0.03 for lv in levels}}
    return {"ms": ms, "date": "test", "sizes": {"galois_key_bytes": 1_500_000,
                                                "relin_key_bytes": 1_500_000,
                                                "seeded_ciphertext_bytes": 200_000}}


@pytest.fixture(scope="module")
def cands():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search, "load_or_calibrate", fake_calibration)
        return search.candidates(zoo.load("fmnist-cryptonets"))


def test_objectives_pick_different_plans(cands):
    assert {c.name.split(",")[0] for c in cands} == {"im2col", "im2col precise", "rotation",
                                                     "rotation precise", "batch"}
    assert search.choose(cands, "latency").name == "im2col"
    assert search.choose(cands, "throughput").name == "batch"
    assert search.choose(cands, "keys").name == "batch"  # no Galois keys at all
    assert search.choose(cands, "latency", max_upload_kb=400).name == "rotation"
    assert search.choose(cands, "upload", max_latency_ms=1000).name == "rotation"
    assert "precise" in search.choose(cands, "latency", precise=True).name


def test_impossible_limits_explain_the_trade_off(cands):
    with pytest.raises(ModelFormatError, match="no candidate plan meets the limits"):
        search.choose(cands, "latency", max_key_mb=0.5)
    assert "| batch" in search.trade_off_table(cands)


def test_key_budget_candidates_trade_time_for_key_bytes(cands):
    by_name = {c.name: c for c in cands}
    for base in ("im2col", "rotation"):
        full = by_name[base]
        variants = [c for c in cands if c.name.startswith(base + ",")]
        assert any(c.name.endswith(" keys") and "pow2" not in c.name for c in variants)
        for c in variants:  # fewer keys, fewer key bytes, composed rotations cost time
            assert c.galois_keys < full.galois_keys and c.key_bytes < full.key_bytes
            assert c.latency_ms >= full.latency_ms
            assert c.report.rotation_steps == c.plan.key_budget["steps"]
    # a key-size limit between a budget variant and the full key set picks the variant
    im2col = by_name["im2col"]
    limit_mb = (im2col.key_bytes - 1) / 1e6
    best = search.choose(cands, "latency", max_key_mb=limit_mb)
    assert best.name.startswith("im2col,") and best.key_bytes <= limit_mb * 1e6
    assert search.choose(cands, "latency", max_keys=5).galois_keys <= 5
    assert "| Galois keys |" in search.trade_off_table(cands)


def test_key_limits_add_their_own_candidate():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(search, "load_or_calibrate", fake_calibration)
        cands = search.candidates(zoo.load("fmnist-cryptonets"), max_key_mb=11)
    # 11 MB hold the 1.5 MB relinearization key and 6 Galois keys of 1.5 MB (not one of the
    # 3/4 or 1/2 budgets of the 10 steps): the fastest plan within the limit uses exactly 6
    assert "im2col, 6 keys" in {c.name for c in cands}
    best = search.choose(cands, "latency", max_key_mb=11)
    assert best.galois_keys == 6 and best.name.startswith("im2col")
