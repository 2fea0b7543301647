"""The AlexNet-style family: topology, the shipped Fashion-MNIST model encrypted end to end at its
128-bit parameters, and the full-size topology planned without running it."""

import numpy as np
import pytest

from heinfer_models import alexnet, fashion_mnist, zoo
from heinfer_models.evaluate import evaluate_encrypted
from heinfer_packing.lower import lower
from heinfer_packing.report import report

# Logits of the shipped model reach 16; at 24-bit scale over 14 levels the observed max error is
# 0.05..0.09 (bench/results/alexnet_bench.json, 50 images). A wrong mask, diagonal or rotation
# gives errors of order 1 and more.
LOGIT_BOUND = 0.2


def test_family_has_five_convolutions_pools_and_three_dense_layers():
    model = alexnet.build(alexnet.FMNIST_32)
    ops = [layer.op for layer in model.layers]
    assert ops.count("conv2d") == 5 and ops.count("dense") == 3
    assert ops.count("avgpool2d") == 2 and ops.count("poly") == 7
    assert [s.out_channels for s in alexnet.FMNIST_32.convs] == [16, 32, 32, 64, 64]
    assert model.forward(np.zeros((1, 32, 32))).shape == (10,)
    assert alexnet.IMAGENET_224.conv_shapes()[-1] == (256, 6, 6)
    with pytest.raises(ValueError):
        alexnet.AlexNetConfig((1, 32, 32), alexnet.FMNIST_32.convs[:4], (8, 8))


def test_images_are_padded_with_the_black_border():
    images, _ = fashion_mnist.load("test")
    x = fashion_mnist.normalize(images[:2], (1, 32, 32))
    assert x.shape == (2, 1, 32, 32)
    black = (0.0 - fashion_mnist.MEAN) / fashion_mnist.STD
    assert np.all(x[:, :, :2, :] == black) and np.all(x[:, :, :, -2:] == black)
    assert np.array_equal(x[:, :, 2:30, 2:30], fashion_mnist.normalize(images[:2]))


def test_shipped_alexnet_encrypted_matches_plaintext():
    model = zoo.load("fmnist-alexnet")
    images, _ = fashion_mnist.load("test")
    xs = fashion_mnist.normalize(images[:1], model.input_shape)
    res = evaluate_encrypted(model, xs, progress=False, count_ops=False)
    params = res.plan.params
    assert params.security_bits() == 128 and params.poly_modulus_degree == 16384
    assert res.max_logit_error < LOGIT_BOUND, res.max_logit_error
    assert res.agreement == 1.0
    # the 400 MB key target holds for the default plan
    assert res.key_bytes < 400e6


def test_full_size_topology_is_planned_in_little_memory():
    """3x224x224 AlexNet: planned with compaction after pool1 and pool2 and counted on the
    data-free backend (no mask is built)."""
    model = alexnet.topology("alexnet-imagenet-224")
    plan = lower(model, compact=True)
    ops = [s.op for s in plan.steps]
    assert ops.count("compact") == 2 and ops.index("compact") == ops.index("sumpool2d") + 1
    rep = report(plan)
    convs = [lr for lr in rep.layers if lr.name.startswith("conv")]
    assert len(convs) == 5
    assert plan.input_layout.out_groups > 1  # 96 x 55 x 55 outputs exceed the slots
    assert all(lr.count("multiply_plain") > 0 for lr in rep.layers if lr.macs)
    # after compaction the convolutions read power-of-two blocks: cyclic block diagonals
    compacted = [lr.out_layout for lr in rep.layers if lr.name == "compact"]
    assert [lay.split("@")[1].split(",")[0] for lay in compacted] == ["1024", "256"]
