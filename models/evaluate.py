"""Encrypted evaluation of a model on images, with the figures users compare tools by.

Both roles run in this process and share only bytes: the server object never sees the secret
key. Used by the demo (`make demo`), the accuracy records and the benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from heinfer.backends import backend_for_spec, make_backend
from heinfer.backends.base import EvalKeyBytes
from heinfer.backends.counting import CountingBackend
from heinfer.codec import encode_encrypt_bytes, finish_output
from heinfer.params import CKKSParams
from heinfer.plan import CompiledPlan, Plan
from heinfer.profile import profile_layers
from heinfer.progress import Progress
from heinfer_packing.conformal import ConformalNet, lower_conformal
from heinfer_packing.lower import lower
from heinfer_packing.modelfile import Model


@dataclass
class EncryptedEval:
    plan: Plan
    key_bytes: int
    keygen_s: float
    server_s: list[float] = field(default_factory=list)
    encrypt_s: list[float] = field(default_factory=list)
    decrypt_s: list[float] = field(default_factory=list)
    upload_bytes: list[int] = field(default_factory=list)
    download_bytes: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    plain_logits: list[np.ndarray] = field(default_factory=list)
    op_table: str = ""
    op_counts: dict[str, tuple[int, float]] = field(default_factory=dict)
    layer_profile: list[dict] = field(default_factory=list)
    backend: str = ""  # the spec's backend tag, e.g. "pyfhel/seal-4.1"

    @property
    def predictions(self) -> np.ndarray:
        return np.array([int(np.argmax(v)) for v in self.logits])

    @property
    def plain_predictions(self) -> np.ndarray:
        return np.array([int(np.argmax(v)) for v in self.plain_logits])

    @property
    def agreement(self) -> float:
        return float(np.mean(self.predictions == self.plain_predictions))

    @property
    def max_logit_error(self) -> float:
        return float(max(np.abs(a - b).max() for a, b in zip(self.logits, self.plain_logits,
                                                              strict=True)))

    def accuracy(self, labels: np.ndarray) -> float:
        return float(np.mean(self.predictions == np.asarray(labels)[: len(self.logits)]))

    def summary(self, labels: np.ndarray | None = None) -> dict:
        out = {
            "images": len(self.logits),
            "backend": self.backend,
            "params": self.plan.params.describe(),
            "input_layout": str(self.plan.input_layout),
            "input_ciphertexts": self.plan.input_layout.n_ct,
            "server_ms_mean": 1e3 * float(np.mean(self.server_s)),
            "server_ms_median": 1e3 * float(np.median(self.server_s)),
            "encrypt_ms": 1e3 * float(np.mean(self.encrypt_s)),
            "decrypt_ms": 1e3 * float(np.mean(self.decrypt_s)),
            "upload_bytes": int(np.mean(self.upload_bytes)),
            "download_bytes": int(np.mean(self.download_bytes)),
            "eval_key_bytes": self.key_bytes,
            "keygen_s": self.keygen_s,
            "max_logit_error": self.max_logit_error,
            "agreement": self.agreement,
        }
        if labels is not None:
            out["encrypted_accuracy"] = self.accuracy(labels)
        return out


def add_plan_options(ap) -> None:
    """The plan choices every command-line entry point offers."""
    ap.add_argument("--first-conv", default="im2col", choices=["im2col", "rotation"],
                    help="im2col: client arranges windows (fast, larger upload); "
                         "rotation: one ciphertext in (small upload)")
    ap.add_argument("--precise", action="store_true",
                    help="keep the last layer's rescale (smaller error, slower)")


def decode_logits(spec, vectors: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Decoded outputs -> logits (conformal models finish on the client with x)."""
    return finish_output(spec, spec.decode(vectors), x)


def evaluate_encrypted(model: Model, xs: np.ndarray, first_conv: str = "im2col",
                       params: CKKSParams | None = None, progress: bool = True,
                       count_ops: bool = True, backend: str = "tenseal",
                       precise: bool = False, plan: Plan | None = None) -> EncryptedEval:
    """`precise`: keep the last layer's rescale (one more prime, larger special prime: about
    10x smaller logit error, about 1.4x the server time). `plan`: a plan already made for
    `model` (e.g. under a key budget) instead of lowering it here."""
    if plan is None and isinstance(model, ConformalNet):
        plan, _ = lower_conformal(model, model.metadata.get("name", "conformal"),
                                  calib_x=xs[:64], params=params)
    elif plan is None:
        plan = lower(model, params, first_conv=first_conv,
                     final_rescale=True if precise else None)
    server_be = make_backend(plan.params, backend)
    compiled = CompiledPlan(plan, server_be)
    spec = compiled.spec
    client_be = backend_for_spec(spec)  # the backend (and SEAL version) the spec names
    t = time.perf_counter()
    keys = client_be.generate_keys(spec.rotation_steps)
    keygen_s = time.perf_counter() - t
    # the server gets the key bytes only, as over the wire
    server_be.load_eval_keys(EvalKeyBytes(keys.relin_keys, keys.galois_keys,
                                          keys.rotation_steps))
    result = EncryptedEval(plan, keys.nbytes(), keygen_s, backend=spec.backend)
    name = getattr(model, "name", plan.name)
    bar = Progress(len(xs), f"encrypted {name}", unit="img", disable=not progress)
    for x in xs:
        t0 = time.perf_counter()
        body = encode_encrypt_bytes(client_be, spec, x)
        t1 = time.perf_counter()
        cts = [server_be.ciphertext_from_bytes(b) for b in body]
        out = compiled.run(cts)
        reply = [server_be.ciphertext_to_bytes(c) for c in out]
        t2 = time.perf_counter()
        logits = decode_logits(spec, [client_be.decrypt(client_be.ciphertext_from_bytes(b))
                                      for b in reply], x)
        t3 = time.perf_counter()
        result.encrypt_s.append(t1 - t0)
        result.server_s.append(t2 - t1)
        result.decrypt_s.append(t3 - t2)
        result.upload_bytes.append(sum(map(len, body)))
        result.download_bytes.append(sum(map(len, reply)))
        result.logits.append(logits)
        result.plain_logits.append(model.forward(x))
        bar.update()
    bar.close()
    if count_ops and len(xs):
        fresh = [server_be.ciphertext_from_bytes(b)
                 for b in encode_encrypt_bytes(client_be, spec, xs[0])]
        counter = CountingBackend(server_be)
        compiled.run(fresh, counter)
        result.op_table = counter.table()
        result.op_counts = counter.by_op()
        fresh = [server_be.ciphertext_from_bytes(b)
                 for b in encode_encrypt_bytes(client_be, spec, xs[0])]
        result.layer_profile = profile_layers(compiled, fresh)
    return result
