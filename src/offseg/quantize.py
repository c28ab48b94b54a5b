"""int8 models for the CPU: ONNX Runtime static quantisation of the exported ONNX graph.

`quantize_model` exports the model to ONNX (`offseg.export.export_onnx`), runs ONNX Runtime's
pre-processing (shape inference, graph optimisation) and `quantize_static` with QDQ nodes:
int8 weights per output channel (symmetric), uint8 activations with ranges calibrated (min / max)
on a few images that went through the dataset's test pipeline, exactly as evaluation prepares
them. The result is an ONNX file plus its sidecar (`offseg.onnx_model`), which `offseg eval`,
`offseg predict` and `OnnxSegmentor` run.

What is quantised is a preset (`QUANT_PRESETS`), because parts of the network are numerically
sensitive. A node's part of the network is the module it was exported from (`module_paths`).
FreqFusion's sampler stays float in every preset: exported as gathers of channel vectors and their
weights (`GatherSampler`, faster in ONNX Runtime than its GridSample op), its coordinates cannot
take 8 bits.

- "compute": only the ops that carry the arithmetic (Conv, MatMul, Gemm) get int8 inputs;
  softmaxes, LayerNorm / GroupNorm (InstanceNormalization in the graph), GELU, the sampler,
  resizes, element-wise and data-movement ops stay float.
- "ol-attention-float": every op type ONNX Runtime quantises, except in the Offset
  Learning block (modules named `offset_learning`), which stays float but for its two offset
  projections (`cls_offset_proj`, `feat_offset_proj`, int8). What must stay float there is its
  softmax over the pixels and the matmul that weights the features with it: uint8 with one scale
  per tensor flattens attention weights of about 1 / (number of pixels) to a few levels.
- "attention-float" (the default): as "ol-attention-float", and also the softmaxes and the backbone's
  attention matmuls (its only MatMuls) are left out. For speed, not accuracy: ONNX Runtime's
  QLinearSoftmax is several times slower than its float Softmax (3.7 ms against about 1 ms for the
  backbone's largest at 512x512), and it fuses DequantizeLinear -> Softmax -> QuantizeLinear back
  into QLinearSoftmax unless what consumes the softmax is float too, hence the matmuls. (A left-out
  MatMul between DequantizeLinear and QuantizeLinear is still fused into QLinearMatMul; the ones
  after the softmaxes stay float.) docs/inference.md has the profile.
- "all": every op type ONNX Runtime quantises; in OffSeg-T only the GELUs, FreqFusion's
  similarity and kernel normalisation (ReduceSum, ReduceL2, Sub, Div), its sampler and
  DepthToSpace keep float tensors.

In every preset the exporter's erf GELUs are first fused into single float Gelu nodes (`fuse_gelu`):
quantised piecewise they cost about twice the fused float kernel and gain no accuracy (docs/inference.md).

docs/inference.md gives the ablation behind these (benchmarks/bench_int8_ablation.py) and the
accuracy and speed of each (benchmarks/bench_int8.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .export import _import, export_onnx
from .onnx_model import write_sidecar

__all__ = [
    "QUANT_PRESETS",
    "DEFAULT_PRESET",
    "calibration_images",
    "fuse_gelu",
    "fuse_gelu_file",
    "module_paths",
    "quantize_model",
    "quantize_onnx",
]

# preset -> (op types to quantise, None for every type ONNX Runtime quantises; a regular expression
# searched in each node's module path, whose matches stay float, or None)
_OL_ATTENTION = r"/offset_learning/(?!(cls|feat)_offset_proj/)"
# FreqFusion's resampler (gathers and weights, `GatherSampler`) stays float in every preset, as the
# GridSample it replaces in exported graphs did: its coordinates cannot take 8 bits
_SAMPLER = r"/gather_sampler/"
QUANT_PRESETS: dict[str, tuple[tuple[str, ...] | None, str | None]] = {
    "compute": (("Conv", "MatMul", "Gemm"), None),
    "ol-attention-float": (None, _SAMPLER + "|" + _OL_ATTENTION),
    # node paths end in the op's name: ".../attn/Softmax_1" (torchscript), ".../softmax_20" (dynamo)
    "attention-float": (
        None,
        _SAMPLER + "|" + _OL_ATTENTION + r"|(?i:/softmax[^/]*$|^/model/backbone/.*/matmul[^/]*$)",
    ),
    "all": (None, _SAMPLER),
}
DEFAULT_PRESET = "attention-float"


def calibration_images(
    data: str,
    root: str | os.PathLike,
    count: int,
    scale: Sequence[int] | None = None,
    split: str = "train",
) -> list[torch.Tensor]:
    """`count` images of the split (evenly spread over it), through the dataset's test pipeline
    (keep-ratio resize to `scale` = (w, h) when given, normalisation): (3, h, w) float tensors."""
    from .data import build_dataset

    if count < 1:
        raise ValueError(f"--images must be at least 1, got {count}")
    dataset = build_dataset(data, Path(root), split, pipeline="test")
    if len(dataset) == 0:
        raise ValueError(f"{root}: no {split} images found for dataset {data} (calibration needs at least one)")
    if scale is not None:
        dataset.set_test_scale((int(scale[0]), int(scale[1])))
    picks = sorted({int(round(i)) for i in np.linspace(0, len(dataset) - 1, min(count, len(dataset)))})
    return [torch.as_tensor(dataset[i]["image"]) for i in picks]


def _padded_size(image: torch.Tensor, divisor: int) -> tuple[int, int]:
    h, w = int(image.shape[-2]), int(image.shape[-1])
    return h + -h % divisor, w + -w % divisor


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over prepared images, each padded (bottom,
    right, zeros) to the graph's input size as whole inference pads them."""

    def __init__(self, images: Sequence[torch.Tensor], size: tuple[int, int] | None, divisor: int) -> None:
        self.images = list(images)
        self.size = size
        self.divisor = divisor
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        image = self.images[self.position]
        self.position += 1
        h, w = image.shape[-2:]
        target_h, target_w = self.size if self.size is not None else _padded_size(image, self.divisor)
        padded = torch.nn.functional.pad(image.float(), (0, target_w - w, 0, target_h - h))
        return {"image": np.ascontiguousarray(padded[None].numpy())}

    def rewind(self) -> None:
        self.position = 0


def _namespace_path(node: Any) -> str | None:
    """The module path of a node of torch's dynamo exporter, from its "namespace" metadata
    (": ExportWrapper/model: Segmentor/model.decode_head.offset_learning: OffsetLearning/softmax_20:
    aten.softmax.int" -> "/model/decode_head/offset_learning/softmax_20")."""
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), None)
    if not namespace:
        return None
    scopes = [scope.split(":", 1)[0].strip() for scope in namespace.split("/")]
    module = next((scope for scope in reversed(scopes[:-1]) if scope), "")
    return "/" + "/".join([*module.split("."), scopes[-1]]) if module else None


def module_paths(graph: Any, original: Any | None = None) -> dict[str, str]:
    """Node name -> the module path it was exported from: the torchscript exporter names nodes so
    ("/model/decode_head/offset_learning/MatMul_1"); the dynamo exporter's nodes ("node_matmul_20")
    carry it in metadata, which ONNX Runtime's pre-processing drops, so it is read from `original`
    (the graph before pre-processing; node names survive it). Nodes with neither (added by the
    pre-processing, e.g. "Transpose_token_3") take the path of the node producing their first input."""
    known = {node.name: path for node in (original or graph).node if (path := _namespace_path(node)) is not None}
    producer = {out: node for node in graph.node for out in node.output}
    paths: dict[str, str] = {}
    for node in graph.node:
        source = node
        path = source.name if source.name.startswith("/") else known.get(source.name)
        while path is None and source.input and source.input[0] in producer:
            source = producer[source.input[0]]
            path = paths.get(source.name)
        paths[node.name] = path or node.name
    return paths


def _float_nodes(prepared: Path, original: Path, pattern: str) -> list[str]:
    onnx = _import("onnx", "int8 quantisation")
    graph = onnx.load(str(prepared), load_external_data=False).graph
    paths = module_paths(graph, onnx.load(str(original), load_external_data=False).graph)
    keep = re.compile(pattern)
    return [node.name for node in graph.node if keep.search(paths[node.name])]


def fuse_gelu(model: Any) -> int:
    """Replace the exporter's erf GELUs, x * 0.5 * (1 + erf(x / sqrt(2))) as Div, Erf, Add, Mul, Mul,
    by one ONNX Runtime Gelu node each (com.microsoft domain), in place; returns how many.

    ONNX Runtime fuses these chains itself when it loads a float model, but not once they carry QDQ
    nodes: their Add / Mul become QLinearAdd / QLinearMul, and the input's DequantizeLinear is split
    per consumer, which breaks the fusion. The five int8-boundary ops then cost about twice the fused
    float Gelu (about a tenth of OffSeg-T's time, docs/inference.md). A Gelu node is not an op ONNX
    Runtime quantises, so it stays one float kernel between a DequantizeLinear and a QuantizeLinear.
    The fusion is ONNX Runtime's own (its transformer optimiser's `FusionGelu`); each fused node is
    then named after the chain's last node, in the same module, so `module_paths` still finds it.
    """
    _import("onnxruntime", "int8 quantisation")
    from onnxruntime.transformers.fusion_gelu import FusionGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    chain_end = {node.output[0]: node.name for node in model.graph.node if node.op_type == "Mul" and node.output}
    wrapped = OnnxModel(model)
    fusion = FusionGelu(wrapped)
    with _quiet_ort_logs():
        fusion.apply()
    added = {node.name for node in fusion.nodes_to_add}  # the graph holds copies of these nodes
    gelus = [node for node in model.graph.node if node.op_type == "Gelu" and node.name in added]
    for node in gelus:
        last = chain_end.get(node.output[0], "")
        if last.startswith("/"):  # "/model/.../act/Mul_1" -> "/model/.../act/Gelu"
            node.name = last.rsplit("/", 1)[0] + "/Gelu"
    if gelus:
        wrapped.topological_sort()
    return len(gelus)


def fuse_gelu_file(path: str | os.PathLike) -> int:
    """`fuse_gelu` on an ONNX file, rewritten in place when a GELU was fused; returns how many."""
    onnx = _import("onnx", "int8 quantisation")
    model = onnx.load(str(path))
    count = fuse_gelu(model)
    if count:
        onnx.save(model, str(path))
    return count


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: Sequence[torch.Tensor],
    size: tuple[int, int] | None,
    divisor: int = 32,
    preset: str = DEFAULT_PRESET,
) -> dict[str, Any]:
    """Static QDQ int8 quantisation of an fp32 ONNX file (logits output, float input 'image').

    calibration: prepared images (3, h, w); each is padded to `size` (fixed-size graph) or to the
    size divisor (dynamic graph). Returns what was done, for the sidecar.
    """
    if preset not in QUANT_PRESETS:
        raise ValueError(f"unknown quantisation preset {preset!r}: choose from {', '.join(QUANT_PRESETS)}")
    if not calibration:
        raise ValueError("int8 calibration needs at least one image")
    ort = _import("onnxruntime", "int8 quantisation")
    from onnxruntime import quantization as ortq
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for image in calibration:
        padded = _padded_size(image, divisor)
        if size is not None and (padded[0] > size[0] or padded[1] > size[1]):
            raise ValueError(
                f"a calibration image is {image.shape[-2]}x{image.shape[-1]} after the test resize, larger than the "
                f"export size {size[0]}x{size[1]}: give a larger --size, a smaller --scale, or --dynamic"
            )
    op_types, float_pattern = QUANT_PRESETS[preset]
    out_path = Path(out_path)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="offseg-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference + ORT's graph optimisations (constant folding, fusions), as ORT recommends
        # before quantising. ORT's symbolic shape inference does not get through the dynamo
        # exporter's dynamic OffSeg graphs (it raises, leaving a debug copy of the model in the
        # working directory), so dynamic graphs get ONNX's own shape inference.
        with contextlib.redirect_stdout(io.StringIO()), _quiet_ort_logs():
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=size is None)
        gelus = fuse_gelu_file(prepared)
        float_nodes = _float_nodes(prepared, Path(fp32_path), float_pattern) if float_pattern else []
        with _quiet_ort_logs():
            ortq.quantize_static(
                str(prepared),
                str(out_path),
                _Calibration(calibration, size, divisor),
                quant_format=ortq.QuantFormat.QDQ,
                op_types_to_quantize=list(op_types) if op_types is not None else None,
                per_channel=True,
                activation_type=ortq.QuantType.QUInt8,
                weight_type=ortq.QuantType.QInt8,
                nodes_to_exclude=float_nodes,
                # MinMax keeps only each tensor's min and max per image (the augmented graph reduces
                # them), so memory does not grow with the activations
                calibrate_method=ortq.CalibrationMethod.MinMax,
            )
    return {
        "method": "onnxruntime quantize_static, QDQ, MinMax calibration",
        "onnxruntime_version": ort.__version__,
        "preset": preset,
        "weights": "int8, symmetric, per output channel",
        "activations": "uint8, asymmetric, per tensor",
        "op_types_quantized": list(op_types) if op_types is not None else "all supported by onnxruntime",
        "float_modules": float_pattern,
        "float_nodes": len(float_nodes),
        "fused_float_gelus": gelus,
        "calibration_images": len(calibration),
        "seconds": round(time.perf_counter() - start, 1),
    }


@contextlib.contextmanager
def _quiet_ort_logs() -> Iterator[None]:
    """ONNX Runtime's quantisation tools log every skipped tensor at warning level."""
    import logging

    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize_model(
    model: nn.Module,
    out_path: str | os.PathLike,
    calibration: Sequence[torch.Tensor],
    *,
    size: Sequence[int] | None = None,
    dynamic: bool = False,
    preset: str = DEFAULT_PRESET,
    dataset: str | None = None,
    test_scale: Sequence[int] | None = None,
    test_mode: dict[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | None = None,
    keep_fp32: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Export `model` to ONNX, quantise it to int8 with `calibration` images, write OUT.onnx + OUT.json.

    size: (H, W) of a fixed-size graph, multiples of the size divisor (default: the padded size of
    the first calibration image); `dynamic=True` makes batch, height and width free (slow export).
    keep_fp32: also keep the fp32 export there (with its own sidecar).
    Returns the sidecar's quantisation record plus `fp32_check` (the export's own ONNX Runtime check).
    """
    if not calibration:
        raise ValueError("int8 calibration needs at least one image")
    divisor = int(getattr(model, "size_divisor", 32))
    export_size = (int(size[0]), int(size[1])) if size is not None else _padded_size(calibration[0], divisor)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="offseg-quant-") as tmp:
        fp32_path = Path(keep_fp32) if keep_fp32 is not None else Path(tmp) / "fp32.onnx"
        result = export_onnx(model.eval(), fp32_path, export_size, dynamic=dynamic)
        sidecar_fields: dict[str, Any] = dict(
            model_name=getattr(model, "name", ""),
            num_classes=int(getattr(model, "num_classes", 0)),
            size=None if dynamic else export_size,
            size_divisor=divisor,
            dataset=dataset,
            class_names=class_names,
            palette=palette,
            test_scale=test_scale,
            test_mode=test_mode,
        )
        if keep_fp32 is not None:
            write_sidecar(fp32_path, precision="fp32", **sidecar_fields)
        record = quantize_onnx(fp32_path, out_path, calibration, None if dynamic else export_size, divisor, preset)
    write_sidecar(out_path, precision="int8", quantization=record, **sidecar_fields)
    record["fp32_check"] = str(result.checks[0]) if result.checks else None
    return record
