"""ONNX export: the graph runs in ONNX Runtime and gives PyTorch's output.

The default suite exports at small fixed sizes (the TorchScript exporter, seconds each). The
512x512 exports and the dynamic-shape ones (dynamo exporter, minutes for OffSeg) are marked slow:
run them with `pytest -m slow tests/test_export.py`.
"""

import json

import numpy as np
import pytest
import torch

import offseg

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from offseg.cli.main import main  # noqa: E402
from offseg.export import ExportWrapper, check_onnx, export_onnx  # noqa: E402

TOLERANCE = 1e-4  # max|ort - torch| / max(1, max|torch|), the full-model bar of the reference data
EXPORT_MODELS = [name for name in ("offseg-t", "segformer-b0-ol", "segnext-t-ol") if name in offseg.list_models()]


def _model(name: str, num_classes: int = 150):
    torch.manual_seed(0)
    return offseg.create_model(name, num_classes=num_classes).eval()


def _metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_small_fixed_size_export_matches_pytorch(tmp_path):
    path = tmp_path / "offseg-t.onnx"
    # the fast exporter explicitly: a model change that breaks tracing fails here, instead of
    # 'auto' quietly falling back to the (minutes-slow) dynamo exporter
    result = export_onnx(_model("offseg-t", 19), path, size=(128, 160), exporter="torchscript")
    assert result.opset == 17
    assert result.checks[0].max_rel_error <= TOLERANCE, str(result.checks[0])

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 19, 128, 160]
    meta = _metadata(path)
    assert meta["model_name"] == "offseg-t" and meta["num_classes"] == "19"
    assert json.loads(meta["mean"]) == [123.675, 116.28, 103.53]

    # Beyond the tolerance the check compares both float32 results with the float64 one: float32
    # round-off passes (a trained model's float32 logits depart by more than 1e-4, PyTorch's as far
    # from float64 as ONNX Runtime's), a graph that computes something else does not.
    model = _model("offseg-t", 19)
    shapes = [(1, 3, 128, 160)]
    (check,) = check_onnx(path, ExportWrapper(model).eval(), shapes, raw_input=False, labels=False, tolerance=0.0)
    assert check.float64_error is not None and check.float32_roundoff is not None
    assert check.passes(1e-7) and "from the float64 result" in str(check), str(check)
    with torch.no_grad():
        model.decode_head.offset_learning.cls_repr.add_(1e-3)  # the file no longer computes this model
    (check,) = check_onnx(path, ExportWrapper(model).eval(), shapes, raw_input=False, labels=False, tolerance=1e-7)
    assert not check.passes(1e-7), str(check)


@pytest.mark.parametrize("name", ["offseg-t", "segformer-b0-ol"])
def test_the_fast_network_exports_and_matches_pytorch(tmp_path, name):
    # The network of `optimize_for_inference` (what the benchmark's ONNX Runtime row runs) traces
    # its export formulations: whole-map Offset Learning, CARAFE's gathered neighbourhoods with the
    # kernels' softmax inside, the gather sampler. The check compares them with its PyTorch path.
    from offseg.optimize import optimize_for_inference

    model = _model(name, 19)
    fast = optimize_for_inference(model, (128, 160))
    result = export_onnx(fast.model, tmp_path / "fast.onnx", size=(128, 160), exporter="torchscript")
    assert result.checks[0].max_rel_error <= TOLERANCE, str(result.checks[0])
    session = ort.InferenceSession(str(tmp_path / "fast.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        ref = model(x)
    out = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    assert (out - ref).abs().max() / max(1.0, ref.abs().max()) <= TOLERANCE


@pytest.mark.parametrize("name", ["mask2former-swin-t", "mask2former-swin-t-ol"])
def test_mask2former_fixed_size_export_matches_pytorch(tmp_path, name):
    # The reduced configuration of the reference vectors; the graph computes model(x), the
    # semantic scores. Dynamic exports work too (dynamo, minutes), see docs/export in the README.
    from offseg.models.mask2former import MASK2FORMER_REDUCED

    torch.manual_seed(0)
    model = offseg.create_model(name, num_classes=5, **MASK2FORMER_REDUCED).eval()
    result = export_onnx(model, tmp_path / f"{name}.onnx", size=(64, 96), exporter="torchscript")
    assert result.checks[0].max_rel_error <= TOLERANCE, str(result.checks[0])


def test_raw_input_and_labels(tmp_path):
    """uint8 RGB in, int64 labels out: equal to normalise -> model -> argmax in PyTorch."""
    from offseg.data import normalize_image

    model = _model("segformer-b0-ol", 8)
    path = tmp_path / "labels.onnx"
    result = export_onnx(model, path, size=(96, 128), raw_input=True, labels=True)
    assert result.input_dtype == "uint8" and result.output_name == "labels" and result.output_dtype == "int64"

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)  # H, W, RGB as an image file gives it
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"image": image.transpose(2, 0, 1)[None].copy()})[0]
    assert labels.dtype == np.int64 and labels.shape == (1, 96, 128)
    with torch.no_grad():
        expected = model(normalize_image(image)[None]).argmax(1).numpy()
    assert np.mean(labels == expected) > 0.999


def test_cli_export_with_own_format_checkpoint(tmp_path, capsys):
    model = _model("segformer-b0-ol", 3)
    offseg.save_pretrained(model, tmp_path / "weights", class_names=["a", "b", "c"])
    out = tmp_path / "model.onnx"
    code = main(
        [
            "export",
            "--model",
            "segformer-b0-ol",
            "--checkpoint",
            str(tmp_path / "weights.safetensors"),
            "--format",
            "onnx",
            str(out),
            "--size",
            "64",
            "96",
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "max relative error vs PyTorch" in printed.out and "opset 17" in printed.out
    assert "warning" not in printed.err
    assert json.loads(_metadata(out)["class_names"]) == ["a", "b", "c"]
    # the sidecar: what `offseg eval / predict --onnx` read; the file then runs like the model
    from offseg.onnx_model import OnnxSegmentor

    onnx_model = OnnxSegmentor(out)
    assert onnx_model.config["precision"] == "fp32" and onnx_model.class_names == ["a", "b", "c"]
    assert onnx_model.name == "segformer-b0-ol" and onnx_model.fixed_size == (64, 96)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(onnx_model(x), model.eval()(x), rtol=1e-3, atol=1e-3)


def test_cli_export_without_checkpoint_warns_and_bad_sizes_are_refused(tmp_path, capsys):
    assert (
        main(["export", "--model", "segformer-b0", str(tmp_path / "m.onnx"), "--size", "64", "64", "--no-check"]) == 0
    )
    assert "randomly initialised" in capsys.readouterr().err
    assert main(["export", "--model", "segformer-b0", str(tmp_path / "m.onnx"), "--size", "100", "64"]) == 1
    assert "multiples of 32" in capsys.readouterr().err
    assert main(["export", "--model", "segformer-b0", str(tmp_path / "m.onnx"), "--opset", "13"]) == 1
    assert "17 or newer" in capsys.readouterr().err


@pytest.mark.skipif("segnext-t-ol" not in offseg.list_models(), reason="SegNeXt not registered yet")
def test_segnext_export_fixes_the_nmf_bases(tmp_path):
    """The graph holds the bases of seed 0: equal to PyTorch after decode_head.set_generator(0)."""
    model = _model("segnext-t-ol", 5)
    path = tmp_path / "segnext.onnx"
    result = export_onnx(model, path, size=(64, 96))
    assert result.notes and "seed 0" in result.notes[0]
    assert result.checks[0].max_rel_error <= TOLERANCE
    nmf = model.decode_head.nmf
    assert nmf.seed is None and nmf.generator is None and "random_bases" not in vars(nmf)  # restored

    model.decode_head.set_generator(0)
    check = check_onnx(path, ExportWrapper(model).eval(), [(1, 3, 64, 96)], raw_input=False, labels=False)[0]
    assert check.max_rel_error <= TOLERANCE, str(check)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORT_MODELS)
def test_fixed_512_export_matches_pytorch(tmp_path, name):
    result = export_onnx(_model(name), tmp_path / f"{name}.onnx", size=(512, 512))
    print(f"{name} 512x512 {result.exporter}: {result.checks[0]} (export {result.seconds:.1f} s)")
    assert result.checks[0].max_rel_error <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORT_MODELS)
def test_dynamic_export_matches_pytorch_at_several_sizes(tmp_path, name):
    """Exported at 256x320, checked there, at 128x192 with batch 2, and at 512x512 (where the
    EfficientFormerV2 bias resize is the identity in PyTorch but a Resize node in the graph)."""
    model = _model(name)
    path = tmp_path / f"{name}-dynamic.onnx"
    result = export_onnx(model, path, size=(256, 320), dynamic=True)
    assert result.exporter == "dynamo" and result.opset >= 18
    if hasattr(model.decode_head, "set_generator"):
        model.decode_head.set_generator(0)  # SegNeXt: the bases the export fixed
    checks = result.checks + check_onnx(
        path, ExportWrapper(model).eval(), [(1, 3, 512, 512)], raw_input=False, labels=False
    )
    print(f"{name} dynamic: " + "; ".join(map(str, checks)) + f" (export {result.seconds:.1f} s)")
    assert [c.input_shape for c in checks] == [(1, 3, 256, 320), (2, 3, 128, 192), (1, 3, 512, 512)]
    assert all(c.max_rel_error <= TOLERANCE for c in checks)
