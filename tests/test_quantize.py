"""int8 quantisation (`offseg quantize`) and ONNX models in eval / predict (`--onnx`, the sidecar).

One small OffSeg-T, trained for a few steps on generated street scenes, is quantised with a few
calibration images; the int8 file then runs through `offseg eval` and `offseg predict` and agrees
with the float model on generated validation images.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import offseg  # noqa: E402
from offseg.benchmark import measure_memory, onnx_rows  # noqa: E402
from offseg.cli.main import main  # noqa: E402
from offseg.data import build_dataset, generate_synthetic_dataset  # noqa: E402
from offseg.onnx_model import OnnxSegmentor, SidecarError, read_sidecar  # noqa: E402

SIZE = (64, 96)  # generated scenes (H, W), multiples of 32: the graph's fixed size


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A generated dataset and an OffSeg-T trained on it for a few steps, saved as safetensors."""
    root = tmp_path_factory.mktemp("quant")
    scenes = generate_synthetic_dataset(root / "scenes", num_train=8, num_val=4, size=SIZE)
    torch.manual_seed(0)
    model = offseg.create_model("offseg-t", num_classes=8)
    data = build_dataset("folder", scenes, "train", pipeline="test")
    images = torch.stack([torch.as_tensor(data[i]["image"]) for i in range(len(data))])
    labels = torch.stack([torch.as_tensor(data[i]["label"]).long().reshape(SIZE) for i in range(len(data))])
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(20):
        batch = torch.arange(4) + 4 * (step % 2)
        loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch], ignore_index=255)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    checkpoint = offseg.save_pretrained(model, root / "offseg-t-scenes", class_names=data.class_names)
    int8 = root / "int8.onnx"
    fp32 = root / "fp32.onnx"
    args = ["quantize", "--model", "offseg-t", "--checkpoint", str(checkpoint), "--data", "folder"]
    args += ["--data-root", str(scenes), "--images", "3", str(int8), "--keep-fp32", str(fp32)]
    assert main(args) == 0
    return {"root": root, "scenes": scenes, "model": model, "checkpoint": checkpoint, "int8": int8, "fp32": fp32}


def test_quantize_writes_int8_model_and_sidecar(trained):
    config = read_sidecar(trained["int8"])
    assert config["precision"] == "int8" and config["model_name"] == "offseg-t" and config["num_classes"] == 8
    assert config["input"]["size_policy"] == "fixed" and config["input"]["size"] == list(SIZE)
    assert config["test_mode"]["mode"] == "whole" and config["class_names"][0] == "sky"
    assert config["quantization"]["calibration_images"] == 3
    assert config["quantization"]["preset"] == "attention-float"
    assert config["quantization"]["op_types_quantized"] == "all supported by onnxruntime"
    import onnx

    graph = onnx.load(str(trained["int8"])).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    # the default preset: the Offset Learning attention float, its offset projections int8
    producers = {out: node.op_type for node in graph.node for out in node.output}
    consumers = {name: node.op_type for node in graph.node for name in node.input}
    ol = "/model/decode_head/offset_learning/"
    softmaxes = [node for node in graph.node if node.name.startswith(ol) and node.op_type == "Softmax"]
    assert len(softmaxes) == 2 and all(consumers[node.output[0]] != "QuantizeLinear" for node in softmaxes)
    (projection,) = [node for node in graph.node if node.name == ol + "feat_offset_proj/MatMul"]
    assert {producers[name] for name in projection.input} == {"DequantizeLinear"}
    # attention-float: the backbone's softmaxes stay float, their outputs are not requantised
    backbone_softmaxes = [n for n in graph.node if n.op_type == "Softmax" and n.name.startswith("/model/backbone/")]
    assert backbone_softmaxes and all(consumers[n.output[0]] != "QuantizeLinear" for n in backbone_softmaxes)
    # FreqFusion's sampler (exported as gathers, GatherSampler) stays float: none of its nodes' outputs
    # is quantised but the result it hands on (its last node, a Concat of the channel groups)
    sampler = [node for node in graph.node if "/gather_sampler/" in node.name and "Linear" not in node.op_type]
    requantised = {
        node.op_type for node in sampler if any(consumers.get(out) == "QuantizeLinear" for out in node.output)
    }
    assert len(sampler) > 20 and requantised <= {"Concat"}
    # the exporter's erf GELUs are single float Gelu nodes (offseg.quantize.fuse_gelu)
    ops = [node.op_type for node in graph.node]
    assert "Erf" not in ops and ops.count("Gelu") > 10
    assert trained["int8"].stat().st_size < 0.5 * trained["fp32"].stat().st_size  # int8 weights
    assert read_sidecar(trained["fp32"])["precision"] == "fp32"


def test_fuse_gelu_keeps_the_function():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from offseg.quantize import fuse_gelu

    def scalar(name: str, value: float) -> onnx.TensorProto:
        return helper.make_tensor(name, TensorProto.FLOAT, [], [value])

    nodes = [
        helper.make_node("Div", ["x", "sqrt2"], ["d"], name="/act/Div"),
        helper.make_node("Erf", ["d"], ["e"], name="/act/Erf"),
        helper.make_node("Add", ["e", "one"], ["a"], name="/act/Add"),
        helper.make_node("Mul", ["x", "a"], ["m"], name="/act/Mul"),
        helper.make_node("Mul", ["m", "half"], ["g"], name="/act/Mul_1"),
        helper.make_node("Erf", ["g"], ["y"], name="/other/Erf"),  # a lone erf stays
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "gelu",
        [value("x", TensorProto.FLOAT, [2, 5])],
        [value("y", TensorProto.FLOAT, [2, 5])],
        [scalar("sqrt2", 2**0.5), scalar("one", 1.0), scalar("half", 0.5)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.linspace(-4, 4, 10, dtype=np.float32).reshape(2, 5)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert fuse_gelu(model) == 1
    assert [(n.op_type, n.name) for n in model.graph.node] == [("Gelu", "/act/Gelu"), ("Erf", "/other/Erf")]
    assert not model.graph.initializer  # the chain's constants went with it
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_int8_agrees_with_float_model(trained):
    model = trained["model"]
    int8 = OnnxSegmentor(trained["int8"])
    fp32 = OnnxSegmentor(trained["fp32"])
    val = build_dataset("folder", trained["scenes"], "val", pipeline="test")
    agree = []
    with torch.no_grad():
        for i in range(len(val)):
            x = torch.as_tensor(val[i]["image"])[None]
            want = model(x)
            torch.testing.assert_close(fp32(x), want, rtol=1e-3, atol=1e-3)  # the fp32 export is the model
            agree.append((int8(x).argmax(1) == want.argmax(1)).float().mean().item())
            # smaller inputs are padded to the fixed size and cropped back, as whole inference pads
            assert int8(x[..., :32, :64]).shape == (1, 8, 32, 64)
    assert np.mean(agree) >= 0.95, f"int8 agrees with float on {100 * np.mean(agree):.1f}% of pixels"
    # offseg.predict takes the ONNX model like a PyTorch one (fast=True included)
    assert offseg.predict(int8, trained["scenes"] / "val" / "images" / "000000.png").shape == SIZE
    with pytest.raises(ValueError, match="larger than the file's fixed size"):
        int8(torch.zeros(1, 3, 96, 96))


def test_eval_and_predict_run_onnx_models(trained, tmp_path, capsys):
    scenes = trained["scenes"]
    out = tmp_path / "eval.json"
    args = ["eval", "--onnx", str(trained["int8"]), "--data", "folder", "--data-root", str(scenes)]
    assert main([*args, "--no-progress", "--json", str(out)]) == 0
    int8_report = json.loads(out.read_text())
    assert int8_report["precision"] == "int8" and int8_report["model"] == "offseg-t"
    args = ["eval", "--model", "offseg-t", "--checkpoint", str(trained["checkpoint"]), "--data", "folder"]
    assert main([*args, "--data-root", str(scenes), "--no-progress", "--json", str(out)]) == 0
    float_report = json.loads(out.read_text())
    assert abs(int8_report["mIoU"] - float_report["mIoU"]) < 5
    # predict: label PNGs and overlays, colours from the sidecar
    predictions = tmp_path / "pred"
    args = ["predict", str(scenes / "val" / "images"), "--onnx", str(trained["int8"]), "--out", str(predictions)]
    assert main([*args, "--no-progress"]) == 0
    assert len(list(predictions.glob("*_overlay.png"))) == 4 and len(list(predictions.glob("??????.png"))) == 4
    # --onnx and --checkpoint together, or a model name the file does not hold: clear errors
    bad = ["predict", str(scenes / "val" / "images"), "--onnx", str(trained["int8"]), "--model", "offseg-b"]
    assert main(bad) == 1
    assert "holds model offseg-t, not --model offseg-b" in capsys.readouterr().err


def test_sidecar_of_another_file_is_refused(trained, tmp_path, capsys):
    onnx_file = tmp_path / "model.onnx"
    shutil.copy(trained["int8"], onnx_file)
    shutil.copy(trained["fp32"].with_suffix(".json"), onnx_file.with_suffix(".json"))  # the fp32 file's sidecar
    with pytest.raises(SidecarError, match="does not belong to"):
        OnnxSegmentor(onnx_file)
    args = ["eval", "--onnx", str(onnx_file), "--data", "folder", "--data-root", str(trained["scenes"])]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "model.json does not belong to" in err and "model.onnx" in err
    onnx_file.with_suffix(".json").unlink()
    with pytest.raises(SidecarError, match="no sidecar"):
        OnnxSegmentor(onnx_file)


def test_calibration_folder_without_images_is_refused(trained, tmp_path, capsys):
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / split / "images").mkdir(parents=True)
        (empty / split / "labels").mkdir(parents=True)
    shutil.copy(trained["scenes"] / "classes.txt", empty / "classes.txt")
    args = ["quantize", "--model", "offseg-t", "--checkpoint", str(trained["checkpoint"]), "--data", "folder"]
    assert main([*args, "--data-root", str(empty), str(tmp_path / "q.onnx")]) == 1
    err = capsys.readouterr().err
    assert str(empty) in err and "image" in err
    assert not (tmp_path / "q.onnx").exists()


def test_bench_times_onnx_models(trained, tmp_path, capsys):
    out = tmp_path / "bench.json"
    files = [str(trained["fp32"]), str(trained["int8"])]
    args = ["bench", "--onnx", *files, "--threads", "1", "--runs", "1", "--warmup", "0", "--no-memory"]
    assert main([*args, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["label"] for row in rows] == ["offseg-t fp32.onnx forward", "offseg-t int8.onnx forward"]
    assert all(row["size"] == list(SIZE) and row["num_classes"] == 8 for row in rows)  # from the sidecars
    assert rows[0]["rel_error"] is None and 0 < rows[1]["rel_error"] < 0.5  # int8 against the fp32 file
    # the peak-memory child process runs the file too
    (row,) = onnx_rows([trained["int8"]])
    info = measure_memory(row, threads=1, runs=1, workdir=tmp_path)
    assert 0 < info["build_rss_mb"] <= info["peak_rss_mb"]
    # a fixed-size file runs at its own size only
    assert main(["bench", "--onnx", files[1], "--size", "128", "128", "--no-memory"]) == 1
    assert "fixed-size graph (64x96)" in capsys.readouterr().err


@pytest.mark.slow  # the dynamo exporter takes minutes on OffSeg
def test_dynamic_int8_model_keeps_the_preset(trained, tmp_path):
    # dynamo graphs name nodes "node_softmax_20" and keep the module in metadata, which ONNX Runtime's
    # pre-processing drops; the preset must still find the Offset Learning block
    import onnx

    from offseg.quantize import calibration_images, module_paths, quantize_model

    images = calibration_images("folder", trained["scenes"], 3)
    out = tmp_path / "dynamic.onnx"
    quantize_model(trained["model"], out, images, dynamic=True, keep_fp32=tmp_path / "dynamic_fp32.onnx")
    assert read_sidecar(out)["input"]["size_policy"] == "dynamic"
    graph = onnx.load(str(out)).graph
    paths = module_paths(graph, onnx.load(str(tmp_path / "dynamic_fp32.onnx")).graph)
    consumers = {name: node.op_type for node in graph.node for name in node.input}
    softmaxes = [n for n in graph.node if n.op_type == "Softmax" and "/offset_learning/" in paths[n.name]]
    assert len(softmaxes) == 2 and all(consumers[node.output[0]] != "QuantizeLinear" for node in softmaxes)
    int8 = OnnxSegmentor(out)
    for shape in [(1, 3, *SIZE), (2, 3, 96, 128)]:
        assert int8(torch.zeros(shape)).shape == (shape[0], 8, *shape[2:])
