"""PyTorch in: torch's default ONNX exporter, then the ONNX importer, rewrites and lowering.

    from heinfer_packing import compile_torch
    plan = compile_torch(net, torch.zeros(1, 3, 64, 64), calibration=images)   # (N, 3, 64, 64)

torch is the optional `train` extra (`pip install 'heinfer[train,onnx]'`); the server and the
client never import this module. `load_torch_file` reads what `heinfer compile model.pt` takes:
a whole module saved with `torch.save(net)` (its class must be importable) or a program saved
with `torch.export.save` (`.pt2`).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from heinfer.errors import ModelFormatError
from heinfer.plan import Plan
from heinfer_packing.calib_data import as_calibration
from heinfer_packing.modelfile import Model


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ModelFormatError("PyTorch models need torch: "
                               "pip install 'heinfer[train,onnx]'") from e
    return torch


def _example(example_input: Any, torch) -> Any:
    x = example_input if isinstance(example_input, torch.Tensor) else torch.as_tensor(
        np.asarray(example_input, dtype=np.float32))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise ModelFormatError(f"example input of shape {tuple(x.shape)}: give one image, "
                               "(C, H, W) or (1, C, H, W)")
    return x.float()


def export_onnx(module: Any, example_input: Any, path: str | Path,
                opset: int | None = None) -> Path:
    """torch.onnx.export with its default (dynamo) exporter and opset unless `opset` is given;
    its progress lines are kept out of the output unless it fails."""
    torch = _torch()
    is_program = isinstance(module, torch.export.ExportedProgram)
    if not is_program:
        module.eval()
    args = () if is_program else (_example(example_input, torch),)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), torch.no_grad():
            torch.onnx.export(module, args, str(path), dynamo=True,
                              **({"opset_version": opset} if opset else {}))
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        raise ModelFormatError(f"torch.onnx.export failed: {e}\n{log.getvalue()[-2000:]}") from e
    return Path(path)


def load_torch(module: Any, example_input: Any, name: str | None = None,
               opset: int | None = None, check: bool = True) -> Model:
    """A torch module (eval mode is set) as a heinfer Model, through ONNX (`check`: see
    `load_onnx`)."""
    with tempfile.TemporaryDirectory() as d:
        from heinfer_packing.onnx_import import load_onnx

        path = export_onnx(module, example_input, Path(d) / "model.onnx", opset)
        model = load_onnx(path, name or type(module).__name__.lower(), check=check)
    model.metadata["source"] = f"torch {type(module).__name__}"
    return model


def load_torch_file(path: str | Path, input_shape: tuple[int, ...] | None) -> Model:
    """`torch.save(net)` (.pt/.pth, needs `input_shape`) or `torch.export.save` (.pt2)."""
    torch = _torch()
    path = Path(path)
    if path.suffix == ".pt2":
        program = torch.export.load(str(path))
        return load_torch(program, None, path.stem)
    try:
        obj = torch.load(str(path), weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - unpickling raises many types
        raise ModelFormatError(f"cannot read {path} with torch.load: {e} (save the whole module "
                               "with torch.save(net), its class importable, or use "
                               "torch.export.save for a .pt2)") from e
    if isinstance(obj, dict):
        raise ModelFormatError(f"{path} holds a state_dict (weights without the architecture): "
                               "save the module itself, torch.save(net), or torch.export.save")
    if not isinstance(obj, torch.nn.Module):
        raise ModelFormatError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
    if input_shape is None:
        raise ModelFormatError(f"{path}: give the input shape, e.g. --input-shape 3,64,64")
    return load_torch(obj, torch.zeros((1, *input_shape)), path.stem)


def compile_torch(module: Any, example_input: Any, calibration: Any = None, degree: int = 2,
                  check: str = "auto", **lower_options: Any) -> Plan:
    """Export, import, rewrite (activations fitted on `calibration`: images (N, C, H, W), or
    (images, labels) to record plaintext accuracy per rewrite), lower to a Plan and check it
    as `heinfer compile` does (`check`: auto, ckks, modelled or none; a failing plan is retried
    with safer settings unless `final_rescale`, `scale_bits` or `params` is given, else
    PlanCheckError says what to change). `lower_options` go to `heinfer_packing.lower.lower`
    (params, first_conv, compact, ...). The rewrite table and import notes are in
    `plan.metadata`, the check record in `plan.metadata["check"]`."""
    from heinfer_packing.checking import Setting, check_and_retry, check_inputs, measure_ranges
    from heinfer_packing.lower import lower
    from heinfer_packing.rewrites import format_records, rewrite

    torch = _torch()
    if example_input is not None:  # a calibration of the wrong shape fails before the export
        as_calibration(calibration, tuple(_example(example_input, torch).shape[1:]))
    model = load_torch(module, example_input)
    calib_x, calib_y = as_calibration(calibration, model.input_shape)
    he_model, records = rewrite(model, calib_x, calib_y, degree=degree)
    if calib_x is not None and not he_model.metadata.get("max_abs"):
        he_model.metadata["max_abs"] = measure_ranges(he_model, calib_x[:256])
    current = Setting(bool(lower_options.get("final_rescale")), lower_options.get("scale_bits"))

    def relower(setting: Setting) -> Plan:
        opts = dict(lower_options, scale_bits=setting.scale_bits)
        if setting.precise:
            opts["final_rescale"] = True
        return lower(he_model, **opts)

    plan = relower(current)
    if check != "none":
        xs, source = check_inputs(he_model, calib_x)
        fixed = any(k in lower_options for k in ("final_rescale", "scale_bits", "params"))
        plan, _, _ = check_and_retry(plan, he_model, xs, source, relower, current,
                                     may_retry=not fixed, method=check, log=lambda _: None)
    plan.metadata["rewrites"] = format_records(records)
    return plan
