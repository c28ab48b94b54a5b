"""`offseg quantize`: an int8 ONNX model (ONNX Runtime static quantisation) plus its JSON sidecar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._options import add_scale_argument, choose_test_scale


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..quantize import DEFAULT_PRESET, QUANT_PRESETS

    p = subparsers.add_parser(
        "quantize",
        help="int8 ONNX model for the CPU (ONNX Runtime static quantisation, calibrated on training images)",
        description=(
            "Export the model to ONNX and quantise it to int8 with ONNX Runtime (QDQ, int8 weights per channel, "
            "uint8 activations calibrated on --images training images prepared by the dataset's test pipeline). "
            "Writes OUT.onnx and OUT.json (the sidecar: model, classes, palette, test scale and mode, input size, "
            "the ONNX file's sha256), which `offseg eval --onnx` and `offseg predict --onnx` read. "
            "Needs: pip install 'offseg[export]'."
        ),
    )
    p.add_argument("output", metavar="OUT.onnx", help="int8 ONNX file to write (the sidecar goes to OUT.json)")
    p.add_argument("--model", required=True, help="model name (see offseg.list_models())")
    p.add_argument("--checkpoint", required=True, help="weights (training, official or own-format checkpoint)")
    p.add_argument("--data", required=True, help="dataset of the calibration images: camvid, ade20k, ..., folder")
    p.add_argument("--data-root", required=True, help="dataset root folder")
    p.add_argument("--split", default="train", help="split the calibration images come from (default: train)")
    p.add_argument(
        "--images", type=int, default=100, metavar="N", help="calibration images, spread over the split (default: 100)"
    )
    add_scale_argument(p, "the dataset's official test scale")
    p.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="fixed input size of the graph, multiples of 32 (default: the padded size of the first calibration "
        "image after the test resize; the crop size in slide mode); smaller inputs are padded to it",
    )
    p.add_argument(
        "--dynamic", action="store_true", help="free batch, height and width (dynamo exporter; can take minutes)"
    )
    p.add_argument(
        "--preset",
        choices=tuple(QUANT_PRESETS),
        default=DEFAULT_PRESET,
        help="what is quantised: compute = Conv/MatMul/Gemm only (softmaxes, norms, resizes, element-wise and "
        "data-movement ops stay float); ol-attention-float = every op ONNX Runtime quantises except the Offset "
        "Learning attention (its offset projections are int8); attention-float = the same with every softmax and the "
        "backbone's attention matmuls float too (faster); all = every op ONNX Runtime quantises (the Offset "
        f"Learning model loses about 9 mIoU on CamVid) (default: {DEFAULT_PRESET})",
    )
    p.add_argument("--keep-fp32", metavar="FP32.onnx", help="also keep the fp32 export (with its sidecar) there")
    p.set_defaults(run=run)


def _classes_and_palette(model, data: str, root: str) -> tuple[list[str] | None, list | None]:
    names, palette = getattr(model, "class_names", None), getattr(model, "palette", None)
    if names is not None and palette is not None:
        return names, palette
    from ..data import dataset_info

    try:
        info = dataset_info(root if data == "folder" else data)
    except (ValueError, KeyError, FileNotFoundError):
        return names, palette
    if len(info.class_names) != getattr(model, "num_classes", -1):
        return names, palette
    return names or list(info.class_names), palette if palette is not None else info.palette.tolist()


def run(args: argparse.Namespace) -> int:
    from ..data import dataset_info
    from ..factory import create_model
    from ..inference import default_test_mode
    from ..quantize import calibration_images, quantize_model

    model = create_model(args.model, checkpoint=args.checkpoint).eval()
    scale = choose_test_scale(model, args.scale, "quantize")
    if scale is None:
        try:
            scale = dataset_info(args.data).test_scale
        except (ValueError, KeyError):
            scale = None
    test_mode = default_test_mode(args.model, args.data)
    images = calibration_images(args.data, args.data_root, args.images, scale, split=args.split)
    size = tuple(args.size) if args.size else None
    if test_mode["mode"] == "slide":  # the graph sees crop windows: calibrate on (top-left) windows
        crop_h, crop_w = test_mode["crop_size"]
        images = [image[..., :crop_h, :crop_w] for image in images]
        size = size or (crop_h, crop_w)
    names, palette = _classes_and_palette(model, args.data, args.data_root)
    print(
        f"offseg quantize: {args.model}, {len(images)} calibration images from {args.data} {args.split}, "
        f"preset {args.preset}",
        file=sys.stderr,
    )
    try:
        record = quantize_model(
            model,
            args.output,
            images,
            size=size,
            dynamic=args.dynamic,
            preset=args.preset,
            dataset=args.data,
            test_scale=scale,
            test_mode=test_mode,
            class_names=names,
            palette=palette,
            keep_fp32=args.keep_fp32,
        )
    except ImportError as err:
        raise ValueError(str(err)) from None
    out = Path(args.output)
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, int8, preset {record['preset']}, "
        f"{record['calibration_images']} calibration images, {record['seconds']} s) and {out.with_suffix('.json')}"
    )
    if args.keep_fp32:
        print(f"wrote {args.keep_fp32} (fp32) and {Path(args.keep_fp32).with_suffix('.json')}")
    return 0
