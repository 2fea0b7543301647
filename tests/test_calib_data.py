"""Calibration data for any input shape, and `heinfer-compile` on PyTorch files: every mismatch
is one clear error (exit 2), never an assertion deep inside a layer."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from heinfer.errors import ModelFormatError
from heinfer_models import alexnet
from heinfer_packing import calib_data
from heinfer_packing.cli import main
from heinfer_packing.rewrites import rewrite
from tests import torch_nets as tn


def test_fmnist_calibration_on_a_224_model_is_a_clear_error():
    """The issue's case: --calib-fmnist on AlexNet at 3x224 was a bare AssertionError."""
    model = alexnet.topology("alexnet-imagenet-224")
    with pytest.raises(ModelFormatError, match=r"1x28x28.*\(3, 224, 224\).*--calib-npz"):
        calib_data.from_fmnist(8, model.input_shape)
    with pytest.raises(ModelFormatError, match=r"shape \(2, 1, 28, 28\).*\(3, 224, 224\)"):
        rewrite(model, np.zeros((2, 1, 28, 28)))
    x, y = calib_data.from_fmnist(3, (1, 32, 32))  # padded where it fits
    assert x.shape == (3, 1, 32, 32) and len(y) == 3


def test_npz_calibration_is_checked(tmp_path):
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, x=np.ones((4, 3, 8, 8)), y=np.arange(4))
    np.savez(bad, images=np.ones((4, 3, 8, 8)))
    x, y = calib_data.from_npz(good, (3, 8, 8))
    assert x.shape == (4, 3, 8, 8) and list(y) == [0, 1, 2, 3]
    with pytest.raises(ModelFormatError, match=r"\(4, 3, 8, 8\).*\(1, 8, 8\)"):
        calib_data.from_npz(good, (1, 8, 8))
    with pytest.raises(ModelFormatError, match="no array 'x'.*images"):
        calib_data.from_npz(bad, (3, 8, 8))
    with pytest.raises(ModelFormatError, match="cannot read"):
        calib_data.from_npz(tmp_path / "missing.npz", (3, 8, 8))


def test_image_folder_calibration(tmp_path):
    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 10), colour).save(tmp_path / cls / f"{i}.png")
    x, y = calib_data.from_images(tmp_path, (3, 8, 8), mean=[0.5, 0.5, 0.5], std=[0.5])
    assert x.shape == (4, 3, 8, 8) and list(y) == [0, 0, 1, 1]
    np.testing.assert_allclose(x[0, :, 4, 4], [1.0, -1.0, -1.0])  # red, normalised
    grey, _ = calib_data.from_images(tmp_path, (1, 5, 5), limit=3)
    assert grey.shape == (3, 1, 5, 5)
    with pytest.raises(ModelFormatError, match=r"\(1 or 3, H, W\).*\(2, 8, 8\)"):
        calib_data.from_images(tmp_path, (2, 8, 8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="no image files"):
        calib_data.from_images(tmp_path / "empty", (3, 8, 8))
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ModelFormatError, match="broken.png cannot be read"):
        calib_data.from_images(tmp_path, (3, 8, 8))


def test_compile_a_saved_torch_module(tmp_path, capsys):
    torch.manual_seed(0)
    net = tn.Ops3().eval()
    torch.save(net, tmp_path / "net.pt")
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).uniform(0, 1, (16, 3, 7, 7)))
    out = tmp_path / "plan"
    # --check none: this random-weight net's top logits are nearly tied, so top-1 agreement
    # flips on errors far below the bound; the check itself is tested in test_check.py
    assert main([str(tmp_path / "net.pt"), "--input-shape", "3,7,7", "--calib-npz",
                 str(tmp_path / "calib.npz"), "--out", str(out), "--check", "none"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "importing" in captured.err and "net.pt" in captured.err  # progress (stderr)
    assert "import note:" in text and "gelu_tanh -> degree-2 polynomial" in text
    assert (tmp_path / "plan.plan.json").exists()
    for argv, message in (
            ([str(tmp_path / "weights.pt"), "--input-shape", "3,7,7"], "holds a state_dict"),
            ([str(tmp_path / "net.pt")], "give the input shape"),
            ([str(tmp_path / "net.pt"), "--input-shape", "3,7,7", "--calib-fmnist", "8"],
             r"1x28x28.*\(3, 7, 7\)")):
        assert main(argv + ["--no-progress"]) == 2
        assert re.search(message, capsys.readouterr().err), message


def test_a_torch_export_program_file(tmp_path):
    """`.pt2` (torch.export.save) carries its input shape: no --input-shape needed."""
    from heinfer_packing.torch_import import load_torch_file

    torch.manual_seed(0)
    net = tn.Ops3().eval()
    torch.export.save(torch.export.export(net, (torch.zeros(1, 3, 7, 7),)), tmp_path / "n.pt2")
    model = load_torch_file(tmp_path / "n.pt2", None)
    assert model.input_shape == (3, 7, 7) and model.metadata["import_check_error"] < 1e-6
    x = np.random.default_rng(0).uniform(0, 1, size=(3, 7, 7))
    with torch.no_grad():
        expected = net(torch.as_tensor(x[None], dtype=torch.float32))[0].numpy()
    assert np.abs(model.forward(x) - expected).max() < 1e-5
