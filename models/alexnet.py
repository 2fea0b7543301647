"""The AlexNet-style family: five convolutions, average pooling, three dense layers.

`AlexNetConfig` describes one member (input shape, per-convolution width, kernel, stride and
padding, where the pools sit, the two hidden dense widths, the classes); `build(config)` returns a
model in the project's format with HE-friendly layers only (conv2d, poly, avgpool2d, dense), with
random weights unless a trained set is given. Training lives in `train_alexnet.py` (torch); this
module needs numpy only, so the compiler can plan the full-size topology without torch.

Two members are named:
- `FMNIST_32`: Fashion-MNIST padded to 1x32x32, widths 16-32-32-64-64, conv1 11x11 stride 4,
  then 3x3 convolutions, 2x2 average pools after conv2 and conv5, dense 256-128-64-10 (the
  shipped zoo model `fmnist-alexnet`);
- `IMAGENET_224`: the original topology on 3x224x224 (96-256-384-384-256, 11x11/4, 5x5, 3x3,
  3x3/2 pools, dense 9216-4096-4096-1000) with max pooling already replaced by average pooling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from heinfer_packing.modelfile import Layer, Model


@dataclass(frozen=True)
class ConvSpec:
    out_channels: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    pool: tuple[int, int] | None = None   # (kernel, stride) of the average pool after it


@dataclass(frozen=True)
class AlexNetConfig:
    input_shape: tuple[int, int, int]
    convs: tuple[ConvSpec, ...]
    hidden: tuple[int, int]
    classes: int = 10
    # degree-2 activation used for random members; trained members carry their own
    act: tuple[float, ...] = (0.0, 0.5, 0.1)
    labels: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if len(self.convs) != 5:
            raise ValueError(f"an AlexNet-style network has 5 convolutions, got {len(self.convs)}")

    def conv_shapes(self) -> list[tuple[int, int, int]]:
        """Output shape of each convolution block (after its pool)."""
        c, h, w = self.input_shape
        shapes = []
        for cs in self.convs:
            h = (h + 2 * cs.padding - cs.kernel) // cs.stride + 1
            w = (w + 2 * cs.padding - cs.kernel) // cs.stride + 1
            if cs.pool:
                k, s = cs.pool
                h, w = (h - k) // s + 1, (w - k) // s + 1
            c = cs.out_channels
            shapes.append((c, h, w))
        return shapes

    @property
    def flat(self) -> int:
        return int(np.prod(self.conv_shapes()[-1]))


def widths(ws: tuple[int, ...], hidden: tuple[int, int], side: int = 32, channels: int = 1,
           classes: int = 10) -> AlexNetConfig:
    """The small member's shape with other widths (3x3 convolutions, pools after 1, 2 and 5)."""
    pools = {0, 1, 4}
    convs = tuple(ConvSpec(w, 3, 1, 1, (2, 2) if i in pools else None) for i, w in enumerate(ws))
    return AlexNetConfig((channels, side, side), convs, hidden, classes)


# conv1 11x11 stride 4 (AlexNet's own first layer) brings 32x32 to 8x8 at once, so every later
# convolution works on 8x8 or 4x4 maps: channel blocks of 64 slots, all channels of a layer in
# one ciphertext with room for copies, which is what keeps the encrypted run in seconds.
FMNIST_32 = AlexNetConfig(
    (1, 32, 32),
    (ConvSpec(16, 11, 4, 4), ConvSpec(32, 3, 1, 1, (2, 2)), ConvSpec(32, 3, 1, 1),
     ConvSpec(64, 3, 1, 1), ConvSpec(64, 3, 1, 1, (2, 2))),
    (128, 64))

IMAGENET_224 = AlexNetConfig(
    (3, 224, 224),
    (ConvSpec(96, 11, 4, 2, (3, 2)), ConvSpec(256, 5, 1, 2, (3, 2)), ConvSpec(384, 3, 1, 1),
     ConvSpec(384, 3, 1, 1), ConvSpec(256, 3, 1, 1, (3, 2))),
    (4096, 4096), classes=1000)


def build(config: AlexNetConfig, name: str = "alexnet", weights: dict | None = None,
          acts: list[list[float]] | None = None, seed: int = 0) -> Model:
    """Model in the project's format. `weights`: {layer name: (weight, bias)}; missing layers get
    He-style random weights (for planning and kernel tests). `acts`: 7 coefficient lists."""
    rng = np.random.default_rng(seed)
    weights = weights or {}
    acts = acts or [list(config.act)] * 7
    layers: list[Layer] = []
    c = config.input_shape[0]

    def params(lname: str, shape: tuple[int, ...], fan_in: int):
        if lname in weights:
            return weights[lname]
        return (rng.normal(0, np.sqrt(1.0 / fan_in), shape),
                rng.normal(0, 0.05, shape[0]))

    for i, cs in enumerate(config.convs):
        lname = f"conv{i + 1}"
        w, b = params(lname, (cs.out_channels, c, cs.kernel, cs.kernel), c * cs.kernel ** 2)
        layers.append(Layer(lname, "conv2d", {"stride": cs.stride, "padding": cs.padding}, w, b))
        layers.append(Layer(f"act{i + 1}", "poly", {"coeffs": list(acts[i])}))
        if cs.pool:
            layers.append(Layer(f"pool{i + 1}", "avgpool2d",
                                {"kernel": cs.pool[0], "stride": cs.pool[1]}))
        c = cs.out_channels
    layers.append(Layer("flatten", "flatten", {}))
    n_in = config.flat
    for j, n_out in enumerate((*config.hidden, config.classes)):
        lname = f"fc{j + 1}"
        w, b = params(lname, (n_out, n_in), n_in)
        layers.append(Layer(lname, "dense", {}, w, b))
        if j < 2:
            layers.append(Layer(f"act{6 + j}", "poly", {"coeffs": list(acts[5 + j])}))
        n_in = n_out
    return Model(name=name, input_shape=config.input_shape, layers=layers,
                 labels=list(config.labels) or [str(k) for k in range(config.classes)])


# Topologies the compiler can plan and price without trained weights (`heinfer-compile NAME`).
TOPOLOGIES = {"alexnet-imagenet-224": IMAGENET_224, "alexnet-fmnist-32": FMNIST_32}


def topology(name: str) -> Model:
    """A named topology with random weights: for its plan, operation counts and predicted cost
    only (its outputs mean nothing)."""
    model = build(TOPOLOGIES[name], name)
    model.metadata = {"untrained": True, "note": "random weights: plan and cost only"}
    return model
