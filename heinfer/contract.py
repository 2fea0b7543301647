"""The packing contract: where each input element goes and where each output is read, in slots.

Any client (the Python SDK, the browser page, a phone) lays out an input and reads the output
from this alone, without heinfer's layout classes (docs/SERVICE.md, "Packing contract"). It is
derived from the layouts themselves (`packing_contract`), so it cannot drift from them;
tests/test_contract.py compares the two slot for slot for every zoo model.

A *run* is six integers `[ct, slot, slot_step, count, element, element_step]`: for k in
0..count-1, slot `slot + k*slot_step` of ciphertext `ct` holds flat (C-order) element
`element + k*element_step`. In a batch contract (`batch: true`) k is the image index instead and
`element_step` is 0: ciphertext `ct` holds element `element` of image k in slot k.
Input: an element may sit in several slots (replicas, im2col windows); every slot no run lists is
0. Output: one slot per element; multiply the decrypted value by `scale`.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field

from heinfer.errors import LayoutError
from heinfer.layout import BatchLayout, Im2colLayout, Layout, unpack

CONTRACT_VERSION = 1
RUN_FIELDS = ["ct", "slot", "slot_step", "count", "element", "element_step"]


class SlotMap(BaseModel):
    shape: list[int] = Field(description="tensor shape; elements are numbered in C order")
    ciphertexts: int = Field(description="how many ciphertexts")
    batch: bool = Field(default=False, description="runs count images (slot k = image k)")
    runs: list[list[int]] = Field(description="[ct, slot, slot_step, count, element, "
                                  "element_step] each")


class InputContract(SlotMap):
    level: int = Field(description="encrypt at this level (the top data level: all primes)")
    scale: float = Field(description="encode at this scale (2**scale_bits)")


class OutputContract(SlotMap):
    scale: float = Field(description="multiply each decrypted value by this")


class PackingContract(BaseModel):
    version: int = CONTRACT_VERSION
    run_fields: list[str] = Field(default_factory=lambda: list(RUN_FIELDS))
    slots: int
    input: InputContract
    output: OutputContract

    # -- the client side, from the contract alone (what the page does in JavaScript) ------
    def pack(self, x: np.ndarray) -> list[np.ndarray]:
        """One image (input shape) -> one slot vector per input ciphertext."""
        return pack(self.input, self.slots, np.asarray(x, dtype=np.float64)[None])

    def pack_batch(self, xs: np.ndarray) -> list[np.ndarray]:
        return pack(self.input, self.slots, np.asarray(xs, dtype=np.float64))

    def unpack(self, vectors: list[np.ndarray], batch: int = 1) -> np.ndarray:
        """Decrypted slot vectors -> outputs, scaled: shape `output.shape` (batch: (batch,
        *shape))."""
        out = self.output
        if len(vectors) < out.ciphertexts:
            raise LayoutError(f"{len(vectors)} ciphertexts given, the output needs "
                              f"{out.ciphertexts}")
        size = int(np.prod(out.shape))
        res = np.zeros((batch, size))
        for ct, slot, sstep, count, elem, estep in out.runs:
            v = np.asarray(vectors[ct])
            slots = slot + sstep * np.arange(count)
            if out.batch:
                res[:, elem] = v[slots[:batch]]
            else:
                res[0, elem + estep * np.arange(count)] = v[slots]
        res *= out.scale
        return res.reshape((batch, *out.shape)) if out.batch else res[0].reshape(out.shape)


def pack(c: InputContract, slots: int, xs: np.ndarray) -> list[np.ndarray]:
    if list(xs.shape[1:]) != list(c.shape):
        raise LayoutError(f"input of shape {tuple(xs.shape[1:])} does not match the contract's "
                          f"{tuple(c.shape)}")
    if not c.batch and len(xs) != 1:
        raise LayoutError("this model takes one image per request (no batch contract)")
    if len(xs) > slots:
        raise LayoutError(f"{len(xs)} images exceed {slots} slots")
    flat = xs.reshape(len(xs), -1)
    out = [np.zeros(slots) for _ in range(c.ciphertexts)]
    for ct, slot, sstep, count, elem, estep in c.runs:
        if c.batch:
            n = min(count, len(xs))
            out[ct][slot + sstep * np.arange(n)] = flat[:n, elem]
        else:
            out[ct][slot + sstep * np.arange(count)] = flat[0, elem + estep * np.arange(count)]
    return out


# -- derivation from heinfer's layouts (server/compiler side) ----------------------------------
def runs_of(ct: np.ndarray, slot: np.ndarray, elem: np.ndarray) -> list[list[int]]:
    """Greedy maximal affine runs over points sorted by (ct, slot)."""
    n = len(slot)
    if n == 0:
        return []
    ds, de, dc = np.diff(slot), np.diff(elem), np.diff(ct)
    # a run may continue from point j to j+1 when (ds, de) at j equals the step at j-1
    same = np.zeros(max(n - 1, 0), dtype=bool)
    if n > 2:
        same[1:] = (ds[1:] == ds[:-1]) & (de[1:] == de[:-1]) & (dc[1:] == 0)
    breaks = np.flatnonzero(~same)  # positions j (step j -> j+1) that cannot extend a run
    runs = []
    i = 0
    while i < n:
        if i == n - 1 or dc[i] != 0:
            runs.append([int(ct[i]), int(slot[i]), 1, 1, int(elem[i]), 1])
            i += 1
            continue
        # steps i, i+1, ... while same[j] for j > i
        k = np.searchsorted(breaks, i + 1)
        end = int(breaks[k]) if k < len(breaks) else n - 1  # last step index in the run is end-1
        last = end  # points i..last
        runs.append([int(ct[i]), int(slot[i]), int(ds[i]), last - i + 1, int(elem[i]),
                     int(de[i])])
        i = last + 1
    return runs


def _input_map(layout: Layout) -> SlotMap:
    shape = list(layout.shape)
    if isinstance(layout, BatchLayout):
        runs = [[i, 0, 1, layout.slots, i, 0] for i in range(layout.n_ct)]
        return SlotMap(shape=shape, ciphertexts=layout.n_ct, batch=True, runs=runs)
    size = int(np.prod(shape))
    # pack the element numbers themselves: each filled slot then names its element (exact:
    # integers far below 2**53)
    vecs = layout.pack(np.arange(1, size + 1, dtype=np.float64).reshape(shape))
    cts, slots, elems = [], [], []
    for c, v in enumerate(vecs):
        s = np.flatnonzero(v)
        cts.append(np.full(len(s), c))
        slots.append(s)
        elems.append(v[s].astype(np.int64) - 1)
    runs = runs_of(np.concatenate(cts), np.concatenate(slots), np.concatenate(elems))
    return SlotMap(shape=shape, ciphertexts=len(vecs), runs=runs)


def _output_map(layout: Layout) -> SlotMap:
    shape = list(layout.shape)
    if isinstance(layout, Im2colLayout):
        raise LayoutError("an im2col layout is never an output")
    if isinstance(layout, BatchLayout):
        runs = [[i, 0, 1, layout.slots, i, 0] for i in range(layout.n_ct)]
        return SlotMap(shape=shape, ciphertexts=layout.n_ct, batch=True, runs=runs)
    ct, slot = layout.positions()
    ct, slot = np.asarray(ct, dtype=np.int64), np.asarray(slot, dtype=np.int64)
    elem = np.arange(len(slot))
    order = np.lexsort((slot, ct))
    runs = runs_of(ct[order], slot[order], elem[order])
    return SlotMap(shape=shape, ciphertexts=layout.n_ct, runs=runs)


def packing_contract(input_layout: Layout, output_layout: Layout, slots: int, level: int,
                     input_scale: float, output_scale: float) -> PackingContract:
    i, o = _input_map(input_layout), _output_map(output_layout)
    return PackingContract(
        slots=slots,
        input=InputContract(**i.model_dump(), level=level, scale=input_scale),
        output=OutputContract(**o.model_dump(), scale=output_scale))


def check_against_layouts(contract: PackingContract, input_layout: Layout,
                          output_layout: Layout, rng: np.random.Generator) -> None:
    """Slot for slot: the contract's packing equals the layout's, and its reading equals
    `unpack` (raises AssertionError naming the first difference). Used by the tests."""
    shape = tuple(contract.input.shape)
    if contract.input.batch:
        xs = rng.standard_normal((3, *shape))
        want, got = input_layout.pack_batch(xs), contract.pack_batch(xs)
    else:
        x = rng.standard_normal(shape)
        want, got = input_layout.pack(x), contract.pack(x)
    assert len(want) == len(got), f"{len(got)} input ciphertexts, layout has {len(want)}"
    for c, (w, g) in enumerate(zip(want, got, strict=True)):
        bad = np.flatnonzero(w != g)
        assert not len(bad), f"input ct {c} slot {bad[0]}: contract {g[bad[0]]}, layout {w[bad[0]]}"
    vecs = [rng.standard_normal(contract.slots) for _ in range(contract.output.ciphertexts)]
    if contract.output.batch:
        want_out = output_layout.unpack_batch(vecs, 3) * contract.output.scale
        got_out = contract.unpack(vecs, 3)
    else:
        want_out = unpack(output_layout, vecs) * contract.output.scale
        got_out = contract.unpack(vecs)
    assert np.array_equal(want_out, got_out), "output slots differ from the layout's"
