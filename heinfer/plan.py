"""Plans: the executable form of a model, and the public spec a client needs.

A plan is a list of kernel steps (op, attributes, weights) with the CKKS parameters and the input
layout. `build_kernels` instantiates the kernels on a backend (encoding every plaintext once, at
the level where it is used); a dry run (no encoding) derives the rotation steps the client must
make keys for. The public part (`ModelSpec`) holds nothing the client may not see: parameters,
layouts, rotation steps and output decoding; weights stay with the server.

Files: `NAME.plan.json` + `NAME.plan.npz` (see docs/ARCHITECTURE.md, "Plan format").
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from heinfer import __version__
from heinfer.backends.base import Backend, Ciphertext
from heinfer.errors import LayoutError, ModelFormatError, PlanVersionError
from heinfer.kernels.base import BuildContext, Kernel
from heinfer.kernels.conv import RotationConv2d
from heinfer.kernels.dense import DiagonalDense
from heinfer.kernels.im2col import Im2colConv2d
from heinfer.kernels.poly import Poly2, Square
from heinfer.kernels.pool import SumPool2d
from heinfer.layout import Layout, layout_from_dict, layout_to_dict, unpack
from heinfer.params import CKKSParams

PLAN_FORMAT_VERSION = 1


class OutputSpec(BaseModel):
    layout: dict[str, Any] = Field(description="where the outputs sit in the decrypted slots")
    scale: float = Field(default=1.0, description="multiply decoded values by this")
    labels: list[str] = Field(default_factory=list)
    kind: str = Field(default="logits", description="'logits', or 'conformal': decoded values "
                      "are z (one per class) then q; logits = z / (c0 ||x|| + q) + bias, "
                      "computed by the client, which knows x")
    c0: float | None = None
    bias: list[float] | None = None


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

    def input_layout_obj(self) -> Layout:
        return layout_from_dict(self.input_layout)

    def output_layout_obj(self) -> Layout:
        return layout_from_dict(self.output.layout)

    def decode(self, vectors: list[np.ndarray]) -> np.ndarray:
        return unpack(self.output_layout_obj(), vectors) * self.output.scale


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
    def build_kernels(self, backend: Backend, encode: bool = True) -> list[Kernel]:
        ctx = BuildContext(backend, encode_plaintexts=encode)
        layout, level, scale = self.input_layout, self.params.top_level, self.params.scale
        kernels: list[Kernel] = []
        for step in self.steps:
            k = _make_kernel(ctx, step, layout, level, scale)
            kernels.append(k)
            layout, level, scale = k.out_layout, k.out_level, k.out_scale
        return kernels

    def spec(self, backend: Backend | None = None,
             kernels: list[Kernel] | None = None) -> ModelSpec:
        """The public spec; `kernels` already built on `backend` are reused (no second build)."""
        if backend is None:
            from heinfer.backends import make_backend

            backend = make_backend(self.params)
        if kernels is None:
            kernels = self.build_kernels(backend, encode=False)
        steps = sorted(set().union(*[k.steps_used for k in kernels]))
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
                              **self.metadata.get("output", {})),
            depth=self.params.top_level - kernels[-1].out_level,
        )

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


def _make_kernel(ctx: BuildContext, step: PlanStep, layout, level: int, scale: float) -> Kernel:
    a = step.attrs
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
                             scale_down_bits=a.get("scale_down_bits", 0))
    if step.op == "sumpool2d":
        return SumPool2d(ctx, a["kernel"], a.get("stride", a["kernel"]), layout, level, scale)
    if step.op == "square":
        return Square(ctx, layout, level, scale, a.get("constant", 0.0))
    if step.op == "poly2":
        return Poly2(ctx, a["coeffs"], layout, level, scale)
    if step.op == "conformal":
        from heinfer.kernels.conformal import ConformalKernel

        return ConformalKernel(ctx, step.weight, a["n_logits"], layout, level, scale,
                               a.get("headroom_bits", 10))
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

    def __init__(self, plan: Plan, backend: Backend):
        self.plan = plan
        self.backend = backend
        self.kernels = plan.build_kernels(backend)
        self.spec = plan.spec(backend, self.kernels)

    def run(self, cts: list[Ciphertext], backend: Backend | None = None) -> list[Ciphertext]:
        be = backend or self.backend
        n_in = self.plan.input_layout.n_ct
        if len(cts) != n_in:
            raise LayoutError(f"model {self.plan.name} takes {n_in} input ciphertext(s), "
                              f"got {len(cts)}")
        for k in self.kernels:
            cts = k.run(be, cts)
        return cts
