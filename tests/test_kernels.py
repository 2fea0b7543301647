"""Every kernel on real CKKS ciphertexts against the numpy forward pass, with asserted bounds.

Parameters are small and insecure (n=4096, 2048 slots, scale 2^30) for speed. Observed errors are
around 1e-4..1e-3 for O(1) values (key-switching noise dominates); the bounds leave room for that
and nothing more: a wrong mask, diagonal or rotation gives errors of order 1.
"""

import numpy as np
import pytest

from heinfer import reference as ref
from heinfer.errors import DepthExhaustedError, LayoutError
from heinfer.layout import GridLayout, Im2colLayout, VectorLayout
from heinfer.plan import PlanStep
from tests.conftest import run_encrypted, small_params

BOUND = 5e-3
SLOTS = 2048


def grid(shape, per_ct, replicas=1):
    c, h, w = shape
    return GridLayout(shape, SLOTS, per_ct, h * w, w, 1, 0, replicas)


def assert_close(he, plain, bound=BOUND):
    err = np.abs(he - plain).max()
    assert err < bound * max(1.0, np.abs(plain).max()), f"max error {err}"


@pytest.mark.parametrize("ci,co,hw,k,stride,pad,per_ct", [
    (3, 4, 8, 3, 1, 1, 3),     # same padding, two output ciphertexts
    (2, 2, 10, 3, 2, 1, 2),    # stride 2 with padding
    (4, 3, 8, 3, 1, 0, 2),     # two input ciphertexts, no padding
    (1, 5, 12, 5, 2, 1, 1),    # CryptoNets-like first layer, single channel
])
def test_rotation_conv_matches_numpy(rng, ci, co, hw, k, stride, pad, per_ct):
    x = rng.normal(size=(ci, hw, hw))
    w = rng.normal(scale=0.3, size=(co, ci, k, k))
    b = rng.normal(size=co)
    step = PlanStep("conv2d", {"stride": stride, "padding": pad}, w, b)
    he, _ = run_encrypted(small_params(1), grid((ci, hw, hw), per_ct), [step], x)
    assert_close(he, ref.conv2d(x, w, b, stride, pad))


def test_replicated_input_conv_needs_no_block_shifts(rng):
    x = rng.normal(size=(1, 10, 10))
    w = rng.normal(scale=0.3, size=(4, 1, 3, 3))
    step = PlanStep("conv2d", {"stride": 1, "padding": 1}, w, None)
    he, compiled = run_encrypted(small_params(1), grid((1, 10, 10), 1, replicas=4), [step], x)
    assert_close(he, ref.conv2d(x, w, None, 1, 1))
    conv = compiled.kernels[0]
    assert conv.r0 == 0 and conv.n_giant == 1
    # baby steps over 3 columns + 2 row giant steps: 5 rotations, not 9
    assert len(conv.chain) <= 3


def _decrypt_replicas(compiled, out_cts, layout):
    """Every replica of a decrypted grid output, as (replicas, C, H, W)."""
    be = compiled.backend
    vec = be.decrypt(out_cts[0])
    ct, slot = layout.positions()
    return np.stack([vec[slot + shift].reshape(layout.shape) for shift in layout.replica_shifts()])


def test_conv_writes_every_free_copy_of_its_output(rng):
    """4 channels of 8x8 fill a quarter of 2048 slots: the output comes in 4 copies, each exact,
    and the next convolution, finding every input channel at r in [0, 4), needs 4 block
    diagonals per pair instead of 7."""
    x = rng.normal(size=(2, 8, 8))
    w1 = rng.normal(scale=0.3, size=(4, 2, 3, 3))
    w2 = rng.normal(scale=0.3, size=(4, 4, 3, 3))
    steps = [PlanStep("conv2d", {"stride": 1, "padding": 1}, w1, np.ones(4)),
             PlanStep("conv2d", {"stride": 1, "padding": 1}, w2, np.full(4, 0.5))]
    he, compiled = run_encrypted(small_params(2), grid((2, 8, 8), 2), steps, x)
    y1 = ref.conv2d(x, w1, np.ones(4), 1, 1)
    assert_close(he, ref.conv2d(y1, w2, np.full(4, 0.5), 1, 1))
    first, second = compiled.kernels
    assert first.out_layout.replicas == SLOTS // (4 * 64)
    n_diag = second.expected_ops["multiply_plain"] / 9
    assert n_diag == 4, n_diag
    # the copies themselves are right (the dense layer after a conv reads them)
    be = compiled.backend
    spec = compiled.spec
    from heinfer.codec import encode_encrypt

    cts = encode_encrypt(be, spec, x)
    mid = compiled.kernels[0](be, cts)
    copies = _decrypt_replicas(compiled, mid, first.out_layout)
    for copy in copies:
        assert_close(copy, y1)


@pytest.mark.parametrize("baby,rows_in_baby", [(1, False), (2, True), (4, False), (8, True)])
def test_conv_baby_giant_split_is_exact_for_every_choice(rng, baby, rows_in_baby):
    """Forcing each baby-step size and row placement gives the same numbers (the compiler only
    chooses among them by cost)."""
    from heinfer.backends import make_backend
    from heinfer.codec import encode_encrypt
    from heinfer.kernels.base import BuildContext
    from heinfer.kernels.conv import RotationConv2d

    x = rng.normal(size=(8, 8, 8))
    w = rng.normal(scale=0.2, size=(8, 8, 3, 3))
    params = small_params(1)
    be = make_backend(params, "tenseal")
    layout = grid((8, 8, 8), 8)
    conv = RotationConv2d(BuildContext(be), w, None, 1, 1, layout, params.depth,
                          params.scale, baby=baby, rows_in_baby=rows_in_baby)
    assert conv.baby == baby and conv.rows_in_baby == rows_in_baby
    be.generate_keys(sorted(conv.steps_used))
    step = PlanStep("conv2d", {"stride": 1, "padding": 1}, w, None)
    from heinfer.plan import Plan

    spec = Plan("t", params, (8, 8, 8), layout, [step]).spec(be, mask_output=False)
    out = conv(be, encode_encrypt(be, spec, x))
    vec = be.decrypt(out[0])
    ct, slot = conv.out_layout.positions()
    assert_close(vec[slot].reshape(8, 8, 8), ref.conv2d(x, w, None, 1, 1))


def test_three_convolutions_chained_without_decryption(rng):
    x = rng.normal(size=(2, 12, 12))
    w1 = rng.normal(scale=0.3, size=(3, 2, 3, 3))
    w2 = rng.normal(scale=0.3, size=(3, 3, 3, 3))
    w3 = rng.normal(scale=0.3, size=(2, 3, 3, 3))
    steps = [PlanStep("conv2d", {"stride": 1, "padding": 1}, w1, np.ones(3)),
             PlanStep("conv2d", {"stride": 2, "padding": 1}, w2, None),
             PlanStep("conv2d", {"stride": 1, "padding": 1}, w3, np.ones(2))]
    he, compiled = run_encrypted(small_params(3), grid((2, 12, 12), 2), steps, x)
    y = ref.conv2d(x, w1, np.ones(3), 1, 1)
    y = ref.conv2d(y, w2, None, 2, 1)
    y = ref.conv2d(y, w3, np.ones(2), 1, 1)
    assert_close(he, y)
    assert [k.out_level for k in compiled.kernels] == [2, 1, 0]


def test_im2col_conv_matches_numpy(rng):
    x = rng.normal(size=(1, 8, 8))
    w = rng.normal(scale=0.3, size=(3, 1, 3, 3))
    b = rng.normal(size=3)
    layout = Im2colLayout((1, 8, 8), 3, (3, 3), 2, 1, SLOTS, 4, SLOTS // 4)
    he, compiled = run_encrypted(small_params(1), layout, [PlanStep("conv2d_im2col", {}, w, b)], x)
    assert_close(he, ref.conv2d(x, w, b, 2, 1))
    assert compiled.kernels[0].out_layout.replicas == 4  # replicated for free


@pytest.mark.parametrize("layout_kind", ["vector", "grid", "grid2ct", "replicated"])
def test_dense_matches_numpy(rng, layout_kind):
    if layout_kind == "vector":
        x = rng.normal(size=(60,))
        layout = VectorLayout(60, SLOTS)
    elif layout_kind == "grid":
        x = rng.normal(size=(3, 5, 5))
        layout = GridLayout((3, 5, 5), SLOTS, 3, 64, 10, 2)  # gaps, as after a stride 2
    elif layout_kind == "grid2ct":
        x = rng.normal(size=(4, 6, 6))
        layout = grid((4, 6, 6), 2)
    else:
        x = rng.normal(size=(2, 6, 6))
        layout = GridLayout((2, 6, 6), SLOTS, 2, 36, 6, 1, 0, 4, SLOTS // 4)
    n = x.size
    w = rng.normal(scale=1 / np.sqrt(n), size=(17, n))
    b = rng.normal(size=17)
    steps = [PlanStep("flatten"), PlanStep("dense", {}, w, b)]
    he, compiled = run_encrypted(small_params(1), layout, steps, x)
    assert_close(he, w @ x.reshape(-1) + b)
    if layout_kind == "replicated":
        assert compiled.kernels[1].replicas > 1


def test_two_dense_layers_chain(rng):
    x = rng.normal(size=(50,))
    w1 = rng.normal(scale=0.15, size=(30, 50))
    w2 = rng.normal(scale=0.2, size=(7, 30))
    steps = [PlanStep("dense", {}, w1, None), PlanStep("square", {"constant": 0.5}),
             PlanStep("dense", {}, w2, np.ones(7))]
    he, _ = run_encrypted(small_params(3), VectorLayout(50, SLOTS), steps, x)
    assert_close(he, w2 @ ((w1 @ x) ** 2 + 0.5) + 1)


def test_sumpool_then_dense(rng):
    x = rng.normal(size=(2, 8, 8))
    w = rng.normal(scale=0.1, size=(5, 2 * 4 * 4))
    steps = [PlanStep("sumpool2d", {"kernel": 2, "stride": 2}), PlanStep("flatten"),
             PlanStep("dense", {}, w, None)]
    he, compiled = run_encrypted(small_params(1), grid((2, 8, 8), 2), steps, x)
    assert_close(he, w @ (4 * ref.avgpool2d(x, 2, 2)).reshape(-1))
    assert compiled.kernels[0].out_level == compiled.kernels[0].in_level  # pooling is free


def test_square_and_generic_poly(rng):
    x = rng.normal(size=(40,))
    layout = VectorLayout(40, SLOTS)
    he, _ = run_encrypted(small_params(1), layout, [PlanStep("square", {"constant": -0.25})], x)
    assert_close(he, x**2 - 0.25)
    coeffs = [0.1, 0.5, 0.25]
    he, compiled = run_encrypted(small_params(2), layout, [PlanStep("poly2", {"coeffs": coeffs})],
                                 x)
    assert_close(he, ref.poly(x, coeffs))
    assert compiled.kernels[0].out_level == 0  # depth 2 exactly


def test_depth_exhaustion_is_reported_at_build(rng):
    x = rng.normal(size=(20,))
    steps = [PlanStep("square"), PlanStep("square"), PlanStep("square")]
    with pytest.raises(DepthExhaustedError, match="add data primes"):
        run_encrypted(small_params(2), VectorLayout(20, SLOTS), steps, x)


def test_layout_mismatch_is_refused(rng):
    x = rng.normal(size=(20,))
    w = rng.normal(size=(3, 1, 3, 3))
    with pytest.raises(LayoutError, match="grid layout"):
        run_encrypted(small_params(1), VectorLayout(20, SLOTS),
                      [PlanStep("conv2d", {"stride": 1, "padding": 1}, w, None)], x)


def test_final_dense_without_rescale_keeps_its_level(rng):
    x = rng.normal(size=(40,))
    w = rng.normal(scale=0.2, size=(6, 40))
    b = rng.normal(size=6)
    step = PlanStep("dense", {"rescale": False, "headroom_bits": 5}, w, b)
    he, compiled = run_encrypted(small_params(1), VectorLayout(40, SLOTS), [step], x)
    assert_close(he, w @ x + b)
    k = compiled.kernels[0]
    assert k.out_level == k.in_level  # no prime consumed


def test_final_dense_without_room_is_refused(rng):
    x = rng.normal(size=(10,))
    step = PlanStep("dense", {"rescale": False, "headroom_bits": 30}, rng.normal(size=(3, 10)),
                    None)
    with pytest.raises(LayoutError, match="weights' scale"):
        run_encrypted(small_params(1), VectorLayout(10, SLOTS), [step], x)


def test_dense_over_inputs_filling_every_slot_of_two_ciphertexts(rng):
    """16 channels of 8x16 fill two ciphertexts: the rows gather cyclically over all slots."""
    x = rng.normal(size=(16, 8, 16))
    w = rng.normal(scale=0.05, size=(10, 16 * 8 * 16))
    b = rng.normal(size=10)
    layout = GridLayout((16, 8, 16), SLOTS, 8, 256, 16, 1)
    steps = [PlanStep("flatten"), PlanStep("dense", {}, w, b)]
    he, compiled = run_encrypted(small_params(1), layout, steps, x)
    assert_close(he, w @ x.reshape(-1) + b)
    dense = compiled.kernels[1]
    assert dense.period * dense.groups == SLOTS


def test_im2col_output_channel_groups_feed_a_rotation_conv(rng):
    """A first layer split in output groups (as AlexNet's 96 x 55 x 55 must be): 3 output
    ciphertexts of 2 channels each from the same uploaded windows, then a convolution over them."""
    x = rng.normal(size=(1, 8, 8))
    w1 = rng.normal(scale=0.3, size=(6, 1, 3, 3))
    b1 = rng.normal(size=6)
    w2 = rng.normal(scale=0.3, size=(2, 6, 3, 3))
    layout = Im2colLayout((1, 8, 8), 6, (3, 3), 1, 1, SLOTS, 4, SLOTS // 4, 2)
    assert layout.out_groups == 3 and layout.group == 2 * 64
    steps = [PlanStep("conv2d_im2col", {}, w1, b1),
             PlanStep("conv2d", {"stride": 1, "padding": 1}, w2, None)]
    he, compiled = run_encrypted(small_params(2), layout, steps, x)
    y1 = ref.conv2d(x, w1, b1, 1, 1)
    assert_close(he, ref.conv2d(y1, w2, None, 1, 1))
    first = compiled.kernels[0]
    assert first.out_layout.n_ct == 3
    assert first.expected_ops["multiply_plain"] == 3 * layout.n_ct


def test_compact_moves_a_pooled_grid_into_dense_blocks(rng):
    """3 channels of 8x8 left at stride 2 in a 16x16 grid (as after pooling), over 2 ciphertexts:
    compacted to blocks of 64 in one ciphertext, values exact, one level."""
    from heinfer.kernels.relayout import Compact, compact_layout, slot_use

    x = rng.normal(size=(3, 8, 8))
    layout = GridLayout((3, 8, 8), SLOTS, 2, 256 * 2, 32, 2)
    assert layout.n_ct == 2 and slot_use(layout) < 0.1
    he, compiled = run_encrypted(small_params(1), layout, [PlanStep("compact")], x)
    assert_close(he, x)
    k = compiled.kernels[0]
    assert isinstance(k, Compact) and k.out_layout == compact_layout(layout)
    assert k.out_layout.n_ct == 1 and k.out_layout.block == 64
    assert k.out_level == k.in_level - 1 and k.out_scale == k.in_scale


def test_im2col_layout_dict_keeps_the_form_older_plans_were_hashed_with():
    """`out_per_ct` is written only when the output is split in groups, so plans saved before the
    field existed load with the same hash."""
    from heinfer.layout import layout_from_dict, layout_to_dict

    one = Im2colLayout((1, 8, 8), 3, (3, 3), 2, 1, SLOTS, 4, SLOTS // 4)
    d = layout_to_dict(one)
    assert "out_per_ct" not in d and layout_from_dict(d) == one
    split = Im2colLayout((1, 8, 8), 6, (3, 3), 1, 1, SLOTS, 4, SLOTS // 4, 2)
    assert layout_to_dict(split)["out_per_ct"] == 2 and layout_from_dict(
        layout_to_dict(split)) == split


def test_dense_with_diagonals_that_encode_to_zero(rng):
    """Weights far below the weight scale's resolution encode to an all-zero plaintext, and
    SEAL refuses the product ('result ciphertext is transparent', issue #11's crash with
    --first-conv rotation). Such diagonals contribute nothing and are skipped."""
    x = rng.normal(size=(40,))
    w = rng.normal(scale=1e-12, size=(6, 40))
    w[0, :2] = rng.normal(scale=0.3, size=2)  # on two diagonals: the others are all tiny
    b = rng.normal(size=6)
    steps = [PlanStep("dense", {}, w, b)]
    he, compiled = run_encrypted(small_params(1), VectorLayout(40, SLOTS), steps, x)
    assert_close(he, w @ x + b)
    dense = compiled.kernels[0]
    assert sum(len(r) for r in dense.plaintexts) < dense.period  # zero diagonals skipped
