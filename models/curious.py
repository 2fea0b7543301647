"""The curious client: decrypt every slot of a model's output, not just the answer.

Used by the model-privacy tests and `bench.privacy_bench` (docs/SERVICE.md, "Threat model").
`probe` runs a plan on real CKKS as the service does (the server side sees key bytes only),
decrypts the whole slot vector of each output ciphertext and splits it into the answer slots
(the spec's output layout) and every other slot, against a numpy forward pass.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from heinfer.backends import make_backend
from heinfer.backends.base import EvalKeyBytes
from heinfer.codec import encode_encrypt_bytes
from heinfer.plan import CompiledPlan, Plan
from heinfer.sanitize import Sanitizer
from heinfer_models import fashion_mnist, zoo
from heinfer_packing.conformal import ConformalNet, lower_conformal
from heinfer_packing.lower import lower
from heinfer_packing.privacy import expected_slots


def zoo_plan(name: str, **lower_opts) -> tuple[object, Plan, np.ndarray]:
    """(model, default plan, 4 real test images in the model's input shape)."""
    model = zoo.load(name)
    images, _ = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[:4], model.input_shape)
    if isinstance(model, ConformalNet):
        plan, _ = lower_conformal(model, name, calib_x=xs, **lower_opts)
    else:
        plan = lower(model, **lower_opts)
    return model, plan, xs


@dataclass
class Probe:
    """Per output ciphertext, over the images: the answer slots' deviation from numpy
    (complex; the true values are real) and the other slots' complex values, in the units of
    the answer (decoded, before the output scale)."""

    answer_dev: dict[int, list[np.ndarray]] = field(default_factory=dict)
    other: dict[int, list[np.ndarray]] = field(default_factory=dict)
    server_s: list[float] = field(default_factory=list)
    reply: list[list[bytes]] = field(default_factory=list)
    levels_used: int = 0

    @property
    def max_other(self) -> float:
        return max(float(np.max(np.abs(np.concatenate(v)))) for v in self.other.values())

    @property
    def max_answer_err(self) -> float:
        return max(float(np.max(np.abs(np.concatenate(v).real)))
                   for v in self.answer_dev.values())

    def noise_bound(self, ct: int, p_fail: float = 1e-6) -> float:
        """A bound on the other slots of ciphertext `ct` if they hold nothing but noise.

        Every slot of a ciphertext decodes the same noise polynomial, so a slot with nothing
        but noise has at most the spread of the answer slots' own deviation from numpy (real
        parts: noise plus the computation's error; imaginary parts, true value 0: noise).
        sigma is estimated from those N deviations, widened to its 1 - p_fail upper confidence
        limit (chi-square quantile, Wilson-Hilferty); the largest of K complex Gaussian slots
        exceeds t sigma with probability K exp(-t^2 / 2): t = sqrt(2 ln(K / p_fail))."""
        dev = np.concatenate(self.answer_dev[ct])
        samples = np.concatenate([dev.real, dev.imag])
        n = len(samples)
        sigma = float(np.sqrt(np.mean(samples**2)))
        z = math.sqrt(2) * _erfc_inv(2 * p_fail)  # upper normal quantile of 1 - p_fail
        chi2 = n * (1 - 2 / (9 * n) + z * math.sqrt(2 / (9 * n))) ** 3
        k = sum(len(o) for o in self.other[ct])
        t = math.sqrt(2 * math.log(k / p_fail))
        return t * sigma * math.sqrt(chi2 / n)

    def within_noise(self) -> dict[int, tuple[float, float]]:
        """Per ciphertext: (largest other slot, its noise bound)."""
        return {c: (float(np.max(np.abs(np.concatenate(self.other[c])))), self.noise_bound(c))
                for c in self.other}


def _erfc_inv(y: float) -> float:
    """Inverse complementary error function by bisection (no scipy at run time)."""
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erfc(mid) > y else (lo, mid)
    return (lo + hi) / 2


def probe(plan: Plan, model, xs: np.ndarray, mask_output: bool = True,
          rerandomize: bool = False) -> Probe:
    """Run `plan` on each x as the service would and decrypt every slot. A sanitized plan
    (`metadata["privacy"]`) is re-randomized and flooded as the server does; `rerandomize`
    re-randomizes an unsanitized plan's outputs (the server does when the client sent its
    public key)."""
    server = make_backend(plan.params)
    compiled = CompiledPlan(plan, server, mask_output=mask_output)
    spec = compiled.spec
    client = make_backend(plan.params)
    keys = client.generate_keys(spec.rotation_steps)
    server.load_eval_keys(EvalKeyBytes(keys.relin_keys, keys.galois_keys, keys.rotation_steps))
    sanitize = None
    if rerandomize or plan.flood_spec() is not None:
        server.load_public_key(client.public_key_bytes())
        sanitize = Sanitizer(server, plan.flood_spec())
    ct_idx, slot_idx = spec.output_layout_obj().positions()
    result = Probe(levels_used=spec.depth)
    for x in xs:
        cts = [server.ciphertext_from_bytes(b) for b in encode_encrypt_bytes(client, spec, x)]
        t = time.perf_counter()
        out = compiled.run(cts)
        if sanitize is not None:
            out = [sanitize(c) for c in out]
        reply = [server.ciphertext_to_bytes(c) for c in out]
        result.server_s.append(time.perf_counter() - t)
        result.reply.append(reply)
        vectors = [client.decrypt_complex(client.ciphertext_from_bytes(b)) for b in reply]
        want = expected_slots(plan, model, x)
        for c, v in enumerate(vectors):
            mine = slot_idx[ct_idx == c]
            result.answer_dev.setdefault(c, []).append(v[mine] - want[ct_idx == c])
            keep = np.ones(len(v), dtype=bool)
            keep[mine] = False
            result.other.setdefault(c, []).append(v[keep])
    return result
