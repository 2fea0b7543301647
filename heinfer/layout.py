"""Layouts: how a tensor maps onto the slots of one or more ciphertexts.

Every kernel takes a layout and returns one; this is the idea behind every packing here. A layout
holds no ciphertexts. `positions()` gives, for each element of the tensor in C order (so
`flatten` is free: it reinterprets the same positions), the ciphertext index and slot holding it.
Slots not listed are *junk*: kernels may leave garbage there and never read it with a non-zero
weight.

- `GridLayout` (C, H, W): channel c in ciphertext c // k, block c % k; element (c, h, w) at slot
  `offset + block*(c % k) + row_stride*h + col_stride*w`. Strided convolutions and pooling keep
  their outputs in place and widen the strides (gaps) instead of compacting, so the next layer
  reads them directly. `replicas` > 1 repeats the k-channel pattern in the following blocks.
  Printed like `[C5/k5@845, H13*13, W13*1]`.
- `VectorLayout` (N,): element j at slot `offset + stride*j` of ciphertext 0.
- `Im2colLayout`: the client arranges the first convolution's input windows itself, tap by tap,
  `taps_per_ct` taps to a ciphertext, each window replicated for every output channel, so the
  server's first convolution is plaintext multiplies and a few rotations (upload for speed).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from heinfer.errors import LayoutError


@dataclass(frozen=True)
class GridLayout:
    shape: tuple[int, int, int]
    slots: int
    channels_per_ct: int
    block: int
    row_stride: int
    col_stride: int = 1
    offset: int = 0
    replicas: int = 1
    replica_stride: int = 0
    kind: str = "grid"

    def __post_init__(self) -> None:
        c, h, w = self.shape
        k = self.channels_per_ct
        if self.replica_stride == 0:
            object.__setattr__(self, "replica_stride", k * self.block)
        last = (self.offset + self.block * (k - 1) + self.replica_stride * (self.replicas - 1)
                + self.row_stride * (h - 1) + self.col_stride * (w - 1))
        if last >= self.slots or self.offset < 0:
            raise LayoutError(f"{self} does not fit in {self.slots} slots (last slot {last})")
        if self.replicas > 1 and c > k:
            raise LayoutError("replicated grid layouts hold all channels in one ciphertext")

    @property
    def n_ct(self) -> int:
        return math.ceil(self.shape[0] / self.channels_per_ct)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        c, h, w = np.meshgrid(*[np.arange(s) for s in self.shape], indexing="ij")
        k = self.channels_per_ct
        ct = (c // k).reshape(-1)
        slot = (self.offset + self.block * (c % k) + self.row_stride * h
                + self.col_stride * w).reshape(-1)
        return ct, slot

    def replica_shifts(self) -> list[int]:
        return [r * self.replica_stride for r in range(self.replicas)]

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != self.shape:
            raise LayoutError(f"tensor of shape {x.shape} does not match layout {self}")
        out = [np.zeros(self.slots) for _ in range(self.n_ct)]
        ct, slot = self.positions()
        flat = x.reshape(-1)
        for shift in self.replica_shifts():
            for i in range(self.n_ct):
                sel = ct == i
                out[i][slot[sel] + shift] = flat[sel]
        return out

    def __str__(self) -> str:
        c, h, w = self.shape
        rep = f" x{self.replicas}@{self.replica_stride}" if self.replicas > 1 else ""
        return (f"[C{c}/k{self.channels_per_ct}@{self.block}{rep}, H{h}*{self.row_stride}, "
                f"W{w}*{self.col_stride}]+{self.offset}")


@dataclass(frozen=True)
class VectorLayout:
    length: int
    slots: int
    offset: int = 0
    stride: int = 1
    kind: str = "vector"

    @property
    def shape(self) -> tuple[int]:
        return (self.length,)

    @property
    def n_ct(self) -> int:
        return 1

    @property
    def size(self) -> int:
        return self.length

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        j = np.arange(self.length)
        return np.zeros(self.length, dtype=int), (self.offset + self.stride * j) % self.slots

    def replica_shifts(self) -> list[int]:
        return [0]

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape != (self.length,):
            raise LayoutError(f"vector of length {x.size} does not match layout {self}")
        out = np.zeros(self.slots)
        out[self.positions()[1]] = x
        return [out]

    def __str__(self) -> str:
        return f"[N{self.length}*{self.stride}]+{self.offset}"


@dataclass(frozen=True)
class Im2colLayout:
    """Client-side arrangement of a first convolution's windows (see module docstring).

    Ciphertext q, group g (g < taps_per_ct) holds tap t = q*taps_per_ct + g, a tap being
    (ci, di, dj) in C order; slot `g*group + co*P + i*Wo + j` holds padded input
    x[ci, stride*i + di, stride*j + dj] (P = Ho*Wo, group = Co*P): the window value that output
    (co, i, j) multiplies by weight[co, ci, di, dj]."""

    in_shape: tuple[int, int, int]
    out_channels: int
    kernel: tuple[int, int]
    stride: int
    padding: int
    slots: int
    taps_per_ct: int
    group_stride: int = 0
    out_per_ct: int = 0   # output channels per output ciphertext (0: all of them)
    kind: str = "im2col"

    def __post_init__(self) -> None:
        if self.out_per_ct <= 0 or self.out_per_ct > self.out_channels:
            object.__setattr__(self, "out_per_ct", self.out_channels)
        if self.group_stride == 0:
            object.__setattr__(self, "group_stride", self.group)
        if self.group_stride < self.group:
            raise LayoutError(f"group stride {self.group_stride} < group size {self.group}")
        if self.taps_per_ct * self.group_stride > self.slots:
            raise LayoutError(f"{self.taps_per_ct} taps of {self.group} slots exceed "
                              f"{self.slots} slots")
        if self.taps_per_ct & (self.taps_per_ct - 1):
            raise LayoutError("taps_per_ct must be a power of two (rotate-and-sum)")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.in_shape

    @property
    def out_hw(self) -> tuple[int, int]:
        _, h, w = self.in_shape
        kh, kw = self.kernel
        return ((h + 2 * self.padding - kh) // self.stride + 1,
                (w + 2 * self.padding - kw) // self.stride + 1)

    @property
    def group(self) -> int:
        ho, wo = self.out_hw
        return self.out_per_ct * ho * wo

    @property
    def out_groups(self) -> int:
        """Output ciphertexts: every one multiplies the same uploaded windows by its channels'
        weights (a first layer wider than the slots, e.g. AlexNet's 96 x 55 x 55)."""
        return math.ceil(self.out_channels / self.out_per_ct)

    @property
    def taps(self) -> int:
        return self.in_shape[0] * self.kernel[0] * self.kernel[1]

    @property
    def n_ct(self) -> int:
        return math.ceil(self.taps / self.taps_per_ct)

    @property
    def size(self) -> int:
        return int(np.prod(self.in_shape))

    def tap(self, t: int) -> tuple[int, int, int]:
        kh, kw = self.kernel
        return t // (kh * kw), (t // kw) % kh, t % kw

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != self.in_shape:
            raise LayoutError(f"image of shape {x.shape} does not match layout {self}")
        p, s = self.padding, self.stride
        xp = np.pad(x, ((0, 0), (p, p), (p, p)))
        ho, wo = self.out_hw
        out = [np.zeros(self.slots) for _ in range(self.n_ct)]
        for t in range(self.taps):
            ci, di, dj = self.tap(t)
            window = xp[ci, di : di + s * ho : s, dj : dj + s * wo : s].reshape(-1)
            q, g = divmod(t, self.taps_per_ct)
            start = g * self.group_stride
            out[q][start : start + self.group] = np.tile(window, self.out_per_ct)
        return out

    def __str__(self) -> str:
        groups = f", {self.out_groups} output groups" if self.out_groups > 1 else ""
        return (f"im2col[{self.taps} taps/{self.taps_per_ct} per ct, "
                f"{self.out_channels}x{self.out_hw[0]}x{self.out_hw[1]}{groups}]")


@dataclass(frozen=True)
class SlotLayout:
    """A vector at explicit slots of one ciphertext (e.g. a dense layer's output spread over the
    replicas of its input)."""

    slot_index: tuple[int, ...]
    slots: int
    ct_index: tuple[int, ...] = ()  # empty: all in ciphertext 0
    kind: str = "slots"

    @property
    def shape(self) -> tuple[int]:
        return (len(self.slot_index),)

    @property
    def n_ct(self) -> int:
        return max(self.ct_index) + 1 if self.ct_index else 1

    @property
    def size(self) -> int:
        return len(self.slot_index)

    def replica_shifts(self) -> list[int]:
        return [0]

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(self.slot_index, dtype=int)
        cts = (np.asarray(self.ct_index, dtype=int) if self.ct_index
               else np.zeros(len(idx), dtype=int))
        return cts, idx

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.shape != self.shape:
            raise LayoutError(f"vector of length {x.size} does not match layout {self}")
        cts, idx = self.positions()
        out = [np.zeros(self.slots) for _ in range(self.n_ct)]
        for c in range(self.n_ct):
            out[c][idx[cts == c]] = x[cts == c]
        return out

    def __str__(self) -> str:
        idx = self.slot_index
        return f"[N{len(idx)} at slots {idx[0]}..{idx[-1]}]"


@dataclass(frozen=True)
class BatchLayout:
    """Batch in slots (throughput mode): tensor element i (C order) in ciphertext i, image b in
    slot b. Layers are scalar multiply-accumulates over ciphertexts; no rotations at all."""

    shape: tuple[int, ...]
    slots: int
    kind: str = "batch"

    @property
    def n_ct(self) -> int:
        return int(np.prod(self.shape))

    @property
    def size(self) -> int:
        return self.n_ct

    def replica_shifts(self) -> list[int]:
        return [0]

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(self.n_ct), np.zeros(self.n_ct, dtype=int)

    def pack_batch(self, xs: np.ndarray) -> list[np.ndarray]:
        """(B, *shape) images -> n_ct slot vectors; B <= slots."""
        xs = np.asarray(xs, dtype=np.float64)
        if xs.shape[1:] != tuple(self.shape) or len(xs) > self.slots:
            raise LayoutError(f"batch of shape {xs.shape} does not match {self} "
                              f"(at most {self.slots} images)")
        flat = xs.reshape(len(xs), -1).T                     # (n_ct, B)
        out = np.zeros((self.n_ct, self.slots))
        out[:, : len(xs)] = flat
        return list(out)

    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        return self.pack_batch(np.asarray(x)[None])

    def unpack_batch(self, vectors: list[np.ndarray], batch: int) -> np.ndarray:
        return np.stack([v[:batch] for v in vectors], axis=1).reshape((batch, *self.shape))

    def __str__(self) -> str:
        return f"batch[{'x'.join(map(str, self.shape))} ciphertexts x {self.slots} images]"


Layout = GridLayout | VectorLayout | Im2colLayout | SlotLayout | BatchLayout
_KINDS = {"grid": GridLayout, "vector": VectorLayout, "im2col": Im2colLayout,
          "slots": SlotLayout, "batch": BatchLayout}


def layout_to_dict(layout: Layout) -> dict[str, Any]:
    d = asdict(layout)
    if isinstance(layout, Im2colLayout) and layout.out_per_ct == layout.out_channels:
        # the default (one output group) is left out: plans written before the field existed
        # keep their hash
        del d["out_per_ct"]
    return d


def layout_from_dict(d: dict[str, Any]) -> Layout:
    d = dict(d)
    cls = _KINDS.get(d.get("kind", ""))
    if cls is None:
        raise LayoutError(f"unknown layout kind {d.get('kind')!r}")
    for key in ("shape", "in_shape", "kernel", "slot_index", "ct_index"):
        if key in d:
            d[key] = tuple(d[key])
    return cls(**d)


def unpack(layout: Layout, vectors: list[np.ndarray]) -> np.ndarray:
    """Read a tensor back from decrypted slot vectors (client side)."""
    if isinstance(layout, Im2colLayout):
        raise LayoutError("an im2col layout is an input arrangement; it is never unpacked")
    ct, slot = layout.positions()
    if len(vectors) < layout.n_ct:
        raise LayoutError(f"{len(vectors)} ciphertexts given, layout {layout} needs "
                          f"{layout.n_ct}")
    flat = np.array([vectors[c][s] for c, s in zip(ct, slot, strict=True)])
    return flat.reshape(layout.shape)
