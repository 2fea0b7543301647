"""The project's own model format: a JSON graph description plus an `.npz` of weights.

A model is a directory `NAME/` holding `model.json` and `weights.npz`:

    {"format": "heinfer-model", "version": 1, "name": "fmnist-cryptonets",
     "input_shape": [1, 28, 28],
     "layers": [{"name": "conv1", "op": "conv2d", "attrs": {"stride": 2, "padding": 1}},
                {"name": "act1", "op": "poly", "attrs": {"coeffs": [c0, c1, c2]}}, ...],
     "labels": ["T-shirt/top", ...], "metadata": {...}}

Layers form a chain (each consumes the previous output). Weights of layer `L` are stored in the
npz under `L.weight` / `L.bias`. Supported ops and their tensors:

| op         | attrs                                  | weights                           |
|------------|----------------------------------------|-----------------------------------|
| conv2d     | stride, padding                        | weight (Co, Ci, kh, kw), bias (Co) |
| avgpool2d  | kernel, stride                         | -                                 |
| poly       | coeffs (c0 + c1 x + c2 x^2 + ...)      | -                                 |
| flatten    | -                                      | -                                 |
| dense      | -                                      | weight (out, in), bias (out)       |

Before HE-friendly rewrites a model may also hold `maxpool2d` (kernel, stride), `activation`
(fn: any of `heinfer.reference.ACTIVATIONS`, or clip with min/max, leaky_relu with alpha),
`batchnorm` (scale, bias, mean, var, eps as attrs; with eps 0, var 1, mean 0 and `affine` it is
an affine map x * scale + bias from ONNX arithmetic) and `dropout`; `packing.rewrites` turns them
into the ops above.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from heinfer.errors import ModelFormatError
from heinfer.plan import read_npz

FORMAT_NAME = "heinfer-model"
FORMAT_VERSION = 1
OPS_WITH_WEIGHTS = {"conv2d", "dense"}
HE_OPS = {"conv2d", "avgpool2d", "poly", "flatten", "dense"}
# Accepted in a model file but rewritten to HE_OPS by packing.rewrites before lowering.
PLAIN_OPS = {"maxpool2d", "activation", "batchnorm", "dropout"}
SUPPORTED_OPS = HE_OPS | PLAIN_OPS


@dataclass
class Layer:
    name: str
    op: str
    attrs: dict[str, Any] = field(default_factory=dict)
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None


@dataclass
class Model:
    name: str
    input_shape: tuple[int, ...]
    layers: list[Layer]
    labels: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Plaintext numpy forward pass for one input of `input_shape`: the oracle for HE runs."""
        from heinfer.reference import forward_layer

        for layer in self.layers:
            x = forward_layer(layer, x)
        return x

    def forward_batch(self, xs: np.ndarray) -> np.ndarray:
        return np.stack([self.forward(x) for x in xs])


def save_model(model: Model, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    layers_json = []
    for layer in model.layers:
        layers_json.append({"name": layer.name, "op": layer.op, "attrs": layer.attrs})
        if layer.weight is not None:
            arrays[f"{layer.name}.weight"] = np.asarray(layer.weight, dtype=np.float64)
        if layer.bias is not None:
            arrays[f"{layer.name}.bias"] = np.asarray(layer.bias, dtype=np.float64)
    doc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "name": model.name,
        "input_shape": list(model.input_shape),
        "layers": layers_json,
        "labels": model.labels,
        "metadata": model.metadata,
    }
    (directory / "model.json").write_text(json.dumps(doc, indent=2) + "\n")
    np.savez_compressed(directory / "weights.npz", **arrays)
    return directory


def load_model(directory: str | Path) -> Model:
    directory = Path(directory)
    try:
        doc = json.loads((directory / "model.json").read_text())
    except FileNotFoundError as e:
        raise ModelFormatError(f"no model.json in {directory}") from e
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{directory}/model.json is not valid JSON: {e}") from e
    if doc.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{directory}/model.json is not a {FORMAT_NAME} file")
    if doc.get("version") != FORMAT_VERSION:
        raise ModelFormatError(
            f"model format version {doc.get('version')} is not supported (this heinfer reads "
            f"version {FORMAT_VERSION})"
        )
    arrays = read_npz(directory / "weights.npz")
    layers = []
    for entry in doc["layers"]:
        op = entry["op"]
        if op not in SUPPORTED_OPS:
            raise ModelFormatError(
                f"layer {entry['name']!r}: unsupported op {op!r}; "
                f"supported: {sorted(SUPPORTED_OPS)}"
            )
        layer = Layer(entry["name"], op, dict(entry.get("attrs", {})))
        if op in OPS_WITH_WEIGHTS:
            try:
                layer.weight = arrays[f"{layer.name}.weight"]
                layer.bias = arrays.get(f"{layer.name}.bias")
            except KeyError as e:
                raise ModelFormatError(f"layer {layer.name!r}: missing weights {e}") from e
        layers.append(layer)
    return Model(
        name=doc["name"],
        input_shape=tuple(doc["input_shape"]),
        layers=layers,
        labels=list(doc.get("labels", [])),
        metadata=dict(doc.get("metadata", {})),
    )
