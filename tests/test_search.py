"""Plan choice by objective: candidates priced by a calibration, limits respected."""

import pytest

from heinfer.errors import ModelFormatError
from heinfer_models import zoo
from heinfer_packing import search


def fake_calibration(params):
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
    assert {c.name for c in cands} == {"im2col", "im2col precise", "rotation",
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
