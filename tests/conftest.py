"""Shared fixtures: small *insecure* CKKS parameters for fast kernel tests (real encryption, small
ring), and a helper that runs a list of plan steps encrypted and returns the decoded output."""

from __future__ import annotations

import numpy as np
import pytest

from heinfer.backends import make_backend
from heinfer.codec import decrypt_decode, encode_encrypt
from heinfer.params import CKKSParams
from heinfer.plan import CompiledPlan, Plan, PlanStep


def small_params(depth: int, n: int = 4096, scale_bits: int = 30) -> CKKSParams:
    return CKKSParams.insecure_for_tests(n, [scale_bits + 10] + [scale_bits] * depth
                                         + [scale_bits + 10], scale_bits)


def run_encrypted(params: CKKSParams, layout, steps: list[PlanStep], x: np.ndarray,
                  backend_name: str = "tenseal") -> tuple[np.ndarray, CompiledPlan]:
    """Encrypt x in `layout`, run the steps on ciphertexts (unmasked), decrypt and decode."""
    plan = Plan("test", params, tuple(x.shape), layout, steps)
    be = make_backend(params, backend_name)
    # kernels on their own: no output mask (tests/test_model_privacy.py checks masked plans)
    compiled = CompiledPlan(plan, be, mask_output=False)
    spec = compiled.spec
    be.generate_keys(spec.rotation_steps)
    out = compiled.run(encode_encrypt(be, spec, x))
    return decrypt_decode(be, spec, out), compiled


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _no_user_client_config(monkeypatch, tmp_path_factory):
    """The CLI and SDK read HEINFER_URL/_API_KEY/... and ~/.config/heinfer/config.toml: the
    tests see neither the developer's variables nor their config file."""
    for var in ("HEINFER_URL", "HEINFER_API_KEY", "HEINFER_ADMIN_KEY", "HEINFER_CACERT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HEINFER_CONFIG", str(tmp_path_factory.getbasetemp() / "no-config.toml"))
