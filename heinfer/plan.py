"""Plans: the executable form of a model, and the public spec a client needs.

A plan is a list of kernel steps (op, attributes, weights) with the CKKS parameters and the input
layout. `build_kernels` instantiates the kernels on a backend (encoding every plaintext once, at
the level where it is used); a dry run (no encoding) derives the rotation steps the client must
make keys for. The public part (`ModelSpec`) holds nothing the client may not see: parameters,
layouts, rotation steps and output decoding; weights stay with the server.

A plan may carry a Galois key budget (`metadata["galois_keys"]`: at most `max_keys` keys and/or
the keyed `steps`): then the spec lists only the keyed steps and every other rotation runs as a
composition of keyed ones (`heinfer.rotations`, wrapped around the backend by `CompiledPlan`).

Files: `NAME.plan.json` + `NAME.plan.npz` (see docs/ARCHITECTURE.md, "Plan format").
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from heinfer import __version__
from heinfer.backends.base import Backend, Ciphertext
from heinfer.contract import PackingContract, packing_contract
from heinfer.errors import LayoutError, ModelFormatError, PlanVersionError
from heinfer.kernels.base import BuildContext, Kernel
from heinfer.kernels.conv import RotationConv2d
from heinfer.kernels.dense import DiagonalDense
from heinfer.kernels.im2col import Im2colConv2d
from heinfer.kernels.poly import Poly2, PolyEval, Square
from heinfer.kernels.pool import SumPool2d
from heinfer.layout import Layout, layout_from_dict, layout_to_dict, unpack
from heinfer.params import CKKSParams
from heinfer.rotations import RotationKeys, choose_keys

PLAN_FORMAT_VERSION = 1
# metadata entry holding the Galois key budget: {"max_keys": int | None, "steps": [int] | None}
GALOIS_KEYS = "galois_keys"
# metadata entry naming the backend that evaluates the plan ("pyfhel"; absent: the default)
BACKEND = "backend"


class OutputSpec(BaseModel):
    layout: dict[str, Any] = Field(description="where the outputs sit in the decrypted slots")
    scale: float = Field(default=1.0, description="multiply decoded values by this")
    labels: list[str] = Field(default_factory=list)
    kind: str = Field(default="logits", description="'logits', or 'conformal': decoded values "
                      "are z (one per class) then q; logits = z / (c0 ||x|| + q) + bias, "
                      "computed by the client, which knows x")
    c0: float | None = None
    bias: list[float] | None = None
    flood: dict[str, float] | None = Field(
        default=None, description="sanitized plans: the server re-randomizes every output and "
        "adds Gaussian noise of std `sigma` per slot (real and imaginary parts, decoded units "
        "before `scale`) for `stat_bits` bits of statistical security over `queries` "
        "decryptions (heinfer.sanitize); the session must upload the client's public key")


class ModelSpec(BaseModel):
    """The public part of a plan: everything a client needs, nothing it must not see."""

    name: str
    plan_format: int = PLAN_FORMAT_VERSION
    plan_hash: str
    heinfer_version: str = __version__
    backend: str = Field(default="seal-4", description="backend and SEAL version of the server, "
                         "e.g. 'tenseal/seal-4.3'; clients must match the SEAL version")
    params: CKKSParams
    input_shape: list[int]
    input_layout: dict[str, Any]
    rotation_steps: list[int]
    output: OutputSpec
    depth: int
    packing: PackingContract | None = Field(
        default=None, description="slot maps of the input and output (heinfer.contract): "
        "what a client in any language needs to lay out an input and read the output")

    def input_layout_obj(self) -> Layout:
        return layout_from_dict(self.input_layout)

    def output_layout_obj(self) -> Layout:
        return layout_from_dict(self.output.layout)

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        """One input -> slot vectors: through the packing contract (what every client uses),
        or the layout for specs published before it existed."""
        if self.packing is not None:
            return self.packing.pack(x)
        return self.input_layout_obj().pack(x)

    def pack_batch(self, xs: np.ndarray) -> list[np.ndarray]:
        if self.packing is not None:
            if not self.packing.input.batch:
                raise LayoutError(f"model {self.name} is not compiled for batches")
            return self.packing.pack_batch(xs)
        layout = self.input_layout_obj()
        if not hasattr(layout, "pack_batch"):
            raise LayoutError(f"model {self.name} is not compiled for batches (layout {layout})")
        return layout.pack_batch(xs)

    def decode(self, vectors: list[np.ndarray]) -> np.ndarray:
        if self.packing is not None:
            return self.packing.unpack(vectors)
        return unpack(self.output_layout_obj(), vectors) * self.output.scale

    def decode_batch(self, vectors: list[np.ndarray], batch: int) -> np.ndarray:
        if self.packing is not None:
            return self.packing.unpack(vectors, batch)
        return self.output_layout_obj().unpack_batch(vectors, batch) * self.output.scale


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz weights file, or a ModelFormatError saying what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as e:  # missing, truncated, not an npz
        raise ModelFormatError(f"cannot read weights {path}: {e}") from e


@dataclass
class PlanStep:
    op: str
    attrs: dict[str, Any] = field(default_factory=dict)
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None


@dataclass
class Plan:
    name: str
    params: CKKSParams
    input_shape: tuple[int, ...]
    input_layout: Layout
    steps: list[PlanStep]
    output_scale: float = 1.0
    labels: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- building ------------------------------------------------------------------------
    def build_kernels(self, backend: Backend, encode: bool = True,
                      mask_output: bool = True) -> list[Kernel]:
        """`mask_output` (always on when serving): the output ciphertexts hold the answer slots
        and zeros, nothing else (docs/SERVICE.md, "Threat model"); False only to measure what
        an unmasked plan would reveal."""
        ctx = BuildContext(backend, encode_plaintexts=encode)
        layout, level, scale = self.input_layout, self.params.top_level, self.params.scale
        kernels: list[Kernel] = []
        last = self.last_computing_step()
        # metadata "output_mask": "level" (compiler's choice): an OutputMask step, not folded
        fold = self.metadata.get("output_mask", "fold") != "level"
        for i, step in enumerate(self.steps):
            down = self._scale_down_bits(i, level, scale, backend)
            k = _make_kernel(ctx, step, layout, level, scale, down,
                             masked=mask_output and fold and i == last)
            kernels.append(k)
            layout, level, scale = k.out_layout, k.out_level, k.out_scale
        if mask_output and not getattr(kernels[last], "masks_output", False):
            from heinfer.kernels.mask import OutputMask

            kernels.append(OutputMask(ctx, layout, level, scale))
        return kernels

    def last_computing_step(self) -> int:
        """Index of the last step that is not a free `flatten`."""
        return max((i for i, s in enumerate(self.steps) if s.op != "flatten"), default=0)

    def _scale_down_bits(self, i: int, level: int, scale: float, backend: Backend) -> float:
        """How far (in bits, fractional) a rescaling linear layer moves the running scale.

        A square turns scale s into s^2 / p, and the primes are only near 2^bits (they must be
        1 mod 2n): at 24 bits and n=16384 the first square moved the scale by 1.6% and the
        drift compounded, to 2^4.9 times the scale before the last dense layer. Each linear
        layer therefore encodes its weights so that its output is at sqrt(S * p) before a
        square (the square then lands on S exactly) and at S otherwise, S being the plan's
        scale lowered by the step's `scale_down_bits`."""
        step = self.steps[i]
        k = float(step.attrs.get("scale_down_bits", 0))
        if step.op not in _RESCALING_LINEAR or not step.attrs.get("rescale", True):
            return k
        nxt = next((s.op for s in self.steps[i + 1:] if s.op not in _SCALE_NEUTRAL), None)
        target = self.params.scale / 2.0**k
        if nxt == "square":
            target = math.sqrt(self.params.scale * backend.prime(level - 1)) / 2.0**k
        return math.log2(scale / target)

    # -- backend -----------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        """The backend the server evaluates this plan with (`metadata["backend"]`, default
        TenSEAL): clients must make keys and ciphertexts with the same SEAL version, which the
        spec names (`ModelSpec.backend`). "pyfhel" (SEAL 4.1) is what the browser page
        (node-seal, SEAL 4.1) talks to."""
        from heinfer.backends import BACKENDS, DEFAULT_BACKEND

        name = self.metadata.get(BACKEND, DEFAULT_BACKEND)
        if name not in BACKENDS:
            raise ModelFormatError(f"plan {self.name}: metadata.backend {name!r} is not one of "
                                   f"{list(BACKENDS)}")
        return name

    def for_backend(self, name: str) -> Plan:
        """A copy of this plan served by backend `name` (part of the hash: another plan)."""
        from heinfer.backends import BACKENDS, DEFAULT_BACKEND

        if name not in BACKENDS:
            raise ModelFormatError(f"backend {name!r}: choose one of {list(BACKENDS)}")
        # another backend computes it: the copy needs its own check record (heinfer.check)
        meta = {k: v for k, v in self.metadata.items() if k not in (BACKEND, "check")}
        if name != DEFAULT_BACKEND:  # default left out: existing plans keep their hash
            meta[BACKEND] = name
        return replace(self, steps=list(self.steps), labels=list(self.labels), metadata=meta)

    # -- Galois key budget -------------------------------------------------------------------
    @property
    def key_budget(self) -> dict[str, Any] | None:
        """{"max_keys": N or None, "steps": keyed steps or None}, or None (a key per step)."""
        return self.metadata.get(GALOIS_KEYS)

    def with_key_budget(self, max_keys: int | None = None, keys: list[int] | None = None,
                        rotate_ms: dict[str, float] | None = None) -> Plan:
        """A copy of this plan that uses at most `max_keys` Galois keys, or exactly the steps
        `keys`. Without `keys`, the steps are chosen now (`heinfer.rotations.choose_keys`) from
        the kernels' rotations per step, each weighted by `rotate_ms[str(level)]` when given
        (a calibration's rotation times), else counted once. Raises KeyBudgetError when the
        budget cannot compose every step the kernels use."""
        from heinfer.errors import KeyBudgetError

        if max_keys is None and keys is None:
            raise KeyBudgetError("a key budget needs max_keys or an explicit key set")
        if max_keys is not None and (not isinstance(max_keys, int) or max_keys < 0):
            raise KeyBudgetError(f"max_keys must be a non-negative integer, got {max_keys!r}")
        # composed rotations add key-switching noise: the copy needs its own check record
        out = replace(self, steps=list(self.steps), labels=list(self.labels),
                      metadata={k: v for k, v in self.metadata.items()
                                if k not in (GALOIS_KEYS, "check")})
        used, counts = out._rotation_use()
        if keys is None:
            weights = {step: 0.0 for step in used}
            for (step, level), n in counts.items():
                cost = 1.0 if rotate_ms is None else float(rotate_ms.get(str(level), 1.0))
                weights[step] = weights.get(step, 0.0) + n * cost
            keys = choose_keys(weights, self.params.slots, max_keys)
        rk = RotationKeys.build(keys, used, self.params.slots, max_keys)
        out.metadata[GALOIS_KEYS] = {"max_keys": max_keys, "steps": list(rk.keys)}
        return out

    def rotation_counts(self) -> Counter[tuple[int, int]]:
        """Rotations by (step, level) in one run of the kernels' own steps (before any key
        budget), counted on the symbolic backend."""
        return self._rotation_use()[1]

    def _rotation_use(self) -> tuple[set[int], Counter[tuple[int, int]]]:
        """The steps the kernels register (what needs a key or a route) and their rotations by
        (step, level) in one symbolic run."""
        from heinfer.backends.counting import CountingBackend
        from heinfer.backends.symbolic import SymbolicBackend

        be = SymbolicBackend(self.params)
        counter = CountingBackend(be)
        cts = [be.encrypt(None) for _ in range(self.input_layout.n_ct)]
        kernels = self.build_kernels(be)
        for k in kernels:
            cts = k.run(counter, cts)
        return set().union(*[k.steps_used for k in kernels]), counter.step_counts

    def rotation_keys(self, kernels: list[Kernel]) -> RotationKeys | None:
        """The keyed steps and composition routes under this plan's key budget (None without
        a budget: every step the kernels use gets its key)."""
        from heinfer.errors import KeyBudgetError

        budget = self.key_budget
        if budget is None:
            return None
        if not isinstance(budget, dict) or not set(budget) <= {"max_keys", "steps"}:
            raise KeyBudgetError(f"plan {self.name}: {GALOIS_KEYS} must be "
                                 f'{{"max_keys": N, "steps": [...]}}, got {budget!r}')
        max_keys, keys = budget.get("max_keys"), budget.get("steps")
        if not (max_keys is None or (isinstance(max_keys, int) and max_keys >= 0)) or not (
                keys is None or (isinstance(keys, list)
                                 and all(isinstance(k, int) for k in keys))):
            raise KeyBudgetError(f"plan {self.name}: {GALOIS_KEYS} {budget!r} needs a "
                                 "non-negative integer max_keys and a list of integer steps")
        used = set().union(*[k.steps_used for k in kernels])
        if keys is None:
            if max_keys is None:
                raise KeyBudgetError(f"plan {self.name}: {GALOIS_KEYS} sets neither max_keys "
                                     "nor steps")
            weights: Counter[int] = Counter({step: 0 for step in used})
            for (step, _level), n in self.rotation_counts().items():
                weights[step] += n
            keys = choose_keys(weights, self.params.slots, max_keys)
        return RotationKeys.build(keys, used, self.params.slots, max_keys)

    def spec(self, backend: Backend | None = None, kernels: list[Kernel] | None = None,
             rotations: RotationKeys | None = None, mask_output: bool = True) -> ModelSpec:
        """The public spec; `kernels` already built on `backend` (and their `rotations` under
        the key budget) are reused (no second build). `mask_output` as in `build_kernels`."""
        if backend is None:
            from heinfer.backends import make_backend

            backend = make_backend(self.params, self.backend_name)
        if kernels is None:
            kernels = self.build_kernels(backend, encode=False, mask_output=mask_output)
        if rotations is None:
            rotations = self.rotation_keys(kernels)
        steps = (list(rotations.keys) if rotations is not None
                 else sorted(set().union(*[k.steps_used for k in kernels])))
        return ModelSpec(
            name=self.name,
            plan_hash=self.hash(),
            backend=getattr(backend, "wire_format", "seal-4"),  # e.g. "tenseal/seal-4.3"
            params=self.params,
            input_shape=list(self.input_shape),
            input_layout=layout_to_dict(self.input_layout),
            rotation_steps=steps,
            output=OutputSpec(layout=layout_to_dict(kernels[-1].out_layout),
                              scale=self.output_scale, labels=self.labels,
                              flood=self.flood_summary(),
                              **self.metadata.get("output", {})),
            depth=self.params.top_level - kernels[-1].out_level,
            packing=packing_contract(self.input_layout, kernels[-1].out_layout,
                                     self.params.slots, self.params.top_level,
                                     self.params.scale, self.output_scale),
        )

    def flood_spec(self):
        """The sanitizing this plan asks for (`heinfer.sanitize.FloodSpec`), or None."""
        from pydantic import ValidationError

        from heinfer.sanitize import PRIVACY, FloodSpec

        doc = self.metadata.get(PRIVACY)
        if doc is None:
            return None
        try:
            return FloodSpec.model_validate(doc)
        except ValidationError as e:
            raise ModelFormatError(f"plan {self.name}: metadata {PRIVACY!r} is not a flooding "
                                   f"spec: {e.errors()[0]['msg']}") from e

    def flood_summary(self) -> dict[str, float] | None:
        f = self.flood_spec()
        return None if f is None else {"stat_bits": f.stat_bits, "queries": f.queries,
                                       "sigma": f.sigma}

    # -- files -----------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for i, s in enumerate(self.steps):
            if s.weight is not None:
                arrays[f"{i}.weight"] = np.asarray(s.weight, dtype=np.float64)
            if s.bias is not None:
                arrays[f"{i}.bias"] = np.asarray(s.bias, dtype=np.float64)
        return arrays

    def _doc(self) -> dict[str, Any]:
        return {
            "format": "heinfer-plan",
            "plan_format": PLAN_FORMAT_VERSION,
            "heinfer_version": __version__,
            "name": self.name,
            "params": self.params.model_dump(),
            "input_shape": list(self.input_shape),
            "input_layout": layout_to_dict(self.input_layout),
            "steps": [{"op": s.op, "attrs": s.attrs} for s in self.steps],
            "output_scale": self.output_scale,
            "labels": self.labels,
            "metadata": self.metadata,
        }

    def hash(self) -> str:
        h = hashlib.sha256(json.dumps(self._doc(), sort_keys=True).encode())
        for key, arr in sorted(self._arrays().items()):
            h.update(key.encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def save(self, path_prefix: str | Path) -> Path:
        p = Path(path_prefix)
        p.parent.mkdir(parents=True, exist_ok=True)
        doc = self._doc()
        doc["hash"] = self.hash()
        Path(f"{p}.plan.json").write_text(json.dumps(doc, indent=1) + "\n")
        buf = io.BytesIO()
        np.savez_compressed(buf, **self._arrays())
        Path(f"{p}.plan.npz").write_bytes(buf.getvalue())
        return Path(f"{p}.plan.json")

    @classmethod
    def load(cls, json_path: str | Path) -> Plan:
        json_path = Path(json_path)
        try:
            doc = json.loads(json_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"cannot read plan {json_path}: {e}") from e
        if doc.get("format") != "heinfer-plan":
            raise ModelFormatError(f"{json_path} is not a heinfer plan")
        if doc.get("plan_format") != PLAN_FORMAT_VERSION:
            raise PlanVersionError(
                f"{json_path} has plan format {doc.get('plan_format')} (written by heinfer "
                f"{doc.get('heinfer_version')}); this heinfer {__version__} reads format "
                f"{PLAN_FORMAT_VERSION}: recompile the model"
            )
        npz_path = Path(str(json_path).removesuffix(".json") + ".npz")
        arrays = read_npz(npz_path)
        steps = [PlanStep(s["op"], s["attrs"], arrays.get(f"{i}.weight"), arrays.get(f"{i}.bias"))
                 for i, s in enumerate(doc["steps"])]
        plan = cls(doc["name"], CKKSParams(**doc["params"]), tuple(doc["input_shape"]),
                   layout_from_dict(doc["input_layout"]), steps, doc.get("output_scale", 1.0),
                   doc.get("labels", []), doc.get("metadata", {}))
        if doc.get("hash") and doc["hash"] != plan.hash():
            raise ModelFormatError(f"{json_path}: content does not match its hash (corrupted?)")
        return plan


_RESCALING_LINEAR = ("conv2d", "conv2d_im2col", "dense", "batch_linear")
_SCALE_NEUTRAL = ("sumpool2d", "batch_sumpool", "flatten")


def _make_kernel(ctx: BuildContext, step: PlanStep, layout, level: int, scale: float,
                 down_bits: float = 0.0, masked: bool = False) -> Kernel:
    """`down_bits`: the step's scale_down_bits after the drift correction (build_kernels).
    `masked`: the step's output leaves the server; kernels that can fold the output mask into
    their plaintexts (dense, conformal; batch kernels have no other slots) set `masks_output`,
    the others get an `OutputMask` after them."""
    k = _make_kernel_inner(ctx, step, layout, level, scale, down_bits, masked)
    if masked and step.op in ("dense", "conformal", "batch_linear", "batch_sumpool"):
        k.masks_output = True
    return k


def _make_kernel_inner(ctx: BuildContext, step: PlanStep, layout, level: int, scale: float,
                       down_bits: float, masked: bool) -> Kernel:
    a = {**step.attrs, "scale_down_bits": down_bits}
    if step.op == "conv2d":
        return RotationConv2d(ctx, step.weight, step.bias, a.get("stride", 1),
                              a.get("padding", 0), layout, level, scale,
                              a.get("out_channels_per_ct"), a.get("scale_down_bits", 0))
    if step.op == "conv2d_im2col":
        return Im2colConv2d(ctx, step.weight, step.bias, layout, level, scale,
                            a.get("scale_down_bits", 0))
    if step.op == "dense":
        return DiagonalDense(ctx, step.weight, step.bias, layout, level, scale, a.get("baby"),
                             rescale=a.get("rescale", True),
                             headroom_bits=a.get("headroom_bits", 6),
                             scale_down_bits=a.get("scale_down_bits", 0), masked=masked,
                             room_below=a.get("room_below", 0))
    if step.op == "compact":
        from heinfer.kernels.relayout import Compact

        return Compact(ctx, layout, level, scale, a.get("baby"), a.get("interleaved", False))
    if step.op == "sumpool2d":
        return SumPool2d(ctx, a["kernel"], a.get("stride", a["kernel"]), layout, level, scale)
    if step.op == "square":
        return Square(ctx, layout, level, scale, a.get("constant", 0.0))
    if step.op == "poly2":
        return Poly2(ctx, a["coeffs"], layout, level, scale)
    if step.op == "poly":
        return PolyEval(ctx, a["coeffs"], layout, level, scale, a.get("scale_down_bits", 0))
    if step.op == "conformal":
        from heinfer.kernels.conformal import ConformalKernel

        return ConformalKernel(ctx, step.weight, a["n_logits"], layout, level, scale,
                               a.get("headroom_bits", 10), masked=masked)
    if step.op == "batch_linear":
        from heinfer.kernels.batch import BatchLinear, conv_matrix

        if step.weight.ndim == 4:
            matrix, out_shape = conv_matrix(step.weight, a.get("stride", 1), a.get("padding", 0),
                                            tuple(layout.shape))
            bias = (None if step.bias is None
                    else np.repeat(step.bias, out_shape[1] * out_shape[2]))
        else:
            matrix, out_shape, bias = step.weight, (step.weight.shape[0],), step.bias
        return BatchLinear(ctx, matrix, bias, out_shape, layout, level, scale,
                           rescale=a.get("rescale", True),
                           headroom_bits=a.get("headroom_bits", 6),
                           scale_down_bits=a.get("scale_down_bits", 0))
    if step.op == "batch_sumpool":
        from heinfer.kernels.batch import BatchSumPool

        return BatchSumPool(ctx, a["kernel"], a.get("stride", a["kernel"]), layout, level, scale)
    if step.op == "flatten":
        from heinfer.kernels.base import Kernel as Identity

        k = Identity(ctx, layout, level, scale)
        k.name = "flatten"
        k.run = lambda be, cts: cts  # type: ignore[method-assign]
        return k
    raise LayoutError(f"plan step with unknown op {step.op!r}")


class CompiledPlan:
    """A plan's kernels built on one backend: what a server worker keeps per loaded model."""

    def __init__(self, plan: Plan, backend: Backend, mask_output: bool = True):
        self.plan = plan
        self.backend = backend
        self.kernels = plan.build_kernels(backend, mask_output=mask_output)
        # under a key budget: the keyed steps and each other step's composition, once
        self.rotations = plan.rotation_keys(self.kernels)
        self.spec = plan.spec(backend, self.kernels, self.rotations)

    def wrap(self, backend: Backend) -> Backend:
        """The backend the kernels must run on: `backend` itself, or (under a key budget) a
        wrapper composing rotations by unkeyed steps. Wrap a CountingBackend, not the reverse,
        so that counts include the composed rotations."""
        return self.rotations.wrap(backend) if self.rotations is not None else backend

    def run(self, cts: list[Ciphertext], backend: Backend | None = None) -> list[Ciphertext]:
        be = self.wrap(backend or self.backend)
        n_in = self.plan.input_layout.n_ct
        if len(cts) != n_in:
            raise LayoutError(f"model {self.plan.name} takes {n_in} input ciphertext(s), "
                              f"got {len(cts)}")
        for k in self.kernels:
            cts = k.run(be, cts)
        return cts
