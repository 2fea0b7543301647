"""04: a PyTorch model, exported to ONNX, compiled (and checked), then verified encrypted.

    .venv/bin/pip install -e ".[train]"     # torch: only to export; the rest never needs it
    .venv/bin/python examples/04_pytorch_onnx.py

With torch installed this trains a small CNN for a few hundred steps on Fashion-MNIST and exports
it; without torch it uses examples/04_pytorch_cnn.onnx, which this script wrote. Then the same
as on the command line:

    heinfer compile model.onnx --calib-fmnist 200 --out plans/mine
    heinfer verify plans/mine.plan.json --inputs test.npz

The compiler imports the ONNX graph, fits the ReLU with a polynomial on the calibration data,
lowers it and checks the plan before writing it (docs/COMPILER.md, "The plan check").
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

from heinfer.check import verify_main
from heinfer_models import fashion_mnist
from heinfer_packing.cli import main as compile_main

SAVED = Path(__file__).resolve().parent / "04_pytorch_cnn.onnx"


def export_from_pytorch(path: Path) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 7, stride=3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 10))
    images, labels = fashion_mnist.load("train")
    x = torch.tensor(fashion_mnist.normalize(images[:6400]), dtype=torch.float32)
    y = torch.tensor(labels[:6400], dtype=torch.long)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for i in range(0, len(x), 64):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[i: i + 64]), y[i: i + 64]).backward()
        opt.step()
    net.eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(path), input_names=["x"],
                      output_names=["logits"], opset_version=17, dynamo=False)


with tempfile.TemporaryDirectory() as tmp:
    onnx_path = Path(tmp) / "cnn.onnx"
    try:
        export_from_pytorch(onnx_path)
        print(f"exported from PyTorch to {onnx_path}")
        if "--save" in sys.argv:
            SAVED.write_bytes(onnx_path.read_bytes())
    except ImportError:
        onnx_path = SAVED
        print(f"torch not installed: using {SAVED.name} (exported by this script)")

    prefix = Path(tmp) / "cnn"
    assert compile_main([str(onnx_path), "--calib-fmnist", "200", "--out", str(prefix)]) == 0

    images, labels = fashion_mnist.load("test")
    np.savez(Path(tmp) / "test.npz", x=fashion_mnist.normalize(images[:8]), y=labels[:8])
    code = verify_main([f"{prefix}.plan.json", "--inputs", str(Path(tmp) / "test.npz")])
    assert code == 0
print("OK")
