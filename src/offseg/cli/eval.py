"""`offseg eval`: mIoU of a model on a dataset split, with the per-class table."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ._options import (
    add_onnx_argument,
    add_scale_argument,
    add_test_mode_arguments,
    choose_test_scale,
    load_onnx_model,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on a dataset split (mIoU, per-class table)",
        description="Evaluate a model on a dataset split: per-class IoU / Acc table and aAcc, mIoU, mAcc "
        "(MMSegmentation IoUMetric semantics). The test mode defaults to the official config of the "
        "model x dataset.",
    )
    p.add_argument("--model", help="model name (see `offseg.list_models()`); required unless --onnx is given")
    p.add_argument("--checkpoint", help="weights to evaluate; without it the model is randomly initialised")
    add_onnx_argument(p)
    p.add_argument(
        "--data",
        required=True,
        help="dataset name: ade20k, cityscapes, coco-stuff164k, pascal-context-59, camvid, folder",
    )
    p.add_argument("--data-root", required=True, help="dataset root folder")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    add_test_mode_arguments(p, "the official one for this model and dataset")
    add_scale_argument(p, "the dataset's official test scale")
    p.add_argument("--tta", action="store_true", help="multi-scale + horizontal-flip test-time augmentation")
    p.add_argument(
        "--scales", nargs="+", type=float, metavar="R", help="TTA scale ratios (default: 0.5 0.75 1.0 1.25 1.5 1.75)"
    )
    p.add_argument("--num-classes", type=int, help="number of classes (default: the dataset's)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N images")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    p.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0, help="seed of the global RNG (SegNeXt draws its NMF bases from it)")
    p.add_argument(
        "--exact",
        action="store_true",
        help="run the model as built instead of its inference-optimised copy (offseg.optimize_for_inference)",
    )
    p.set_defaults(run=run)


def resolve_test_mode(args: argparse.Namespace) -> dict:
    """Test mode from the command line, filling gaps from the official default."""
    from ..inference import default_test_mode

    default = default_test_mode(args.model, args.data)
    mode = args.mode or ("slide" if args.crop else default["mode"])
    if mode == "whole":
        return {"mode": "whole", "crop_size": None, "stride": None}
    crop = tuple(args.crop) if args.crop else default["crop_size"]
    if crop is None:
        raise ValueError("--mode slide needs --crop H W (no official crop size for this model and dataset)")
    stride = tuple(args.stride) if args.stride else (default["stride"] if not args.crop and default["stride"] else crop)
    return {"mode": "slide", "crop_size": crop, "stride": stride}


def _json_safe(value):
    # JSON has no NaN: undefined figures (a class absent from labels and predictions) become null.
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def run(args: argparse.Namespace) -> int:
    from .._heap import keep_freed_heap

    # Each forward reuses the memory the previous one freed instead of faulting it in again
    # (benchmarks/bench_heap.py: OffSeg-T 512x512 forwards about 0.9x the time).
    keep_freed_heap()
    import torch
    import torch.nn as nn

    from ..evaluation import evaluate, format_table
    from ..factory import create_model
    from ..inference import DEFAULT_TTA_SCALES

    try:
        from ..data import build_dataset
    except ImportError as err:
        raise ValueError(f"the data layer (offseg.data) is not available: {err}") from err

    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1")
    onnx_model = load_onnx_model(args, "eval") if args.onnx else None
    if args.model is None:
        raise ValueError("give --model (or --onnx)")
    if onnx_model is not None and args.mode is None and not args.crop:
        test_mode = dict(onnx_model.test_mode)  # the sidecar's
    else:
        test_mode = resolve_test_mode(args)
    dataset = build_dataset(args.data, args.data_root, args.split, pipeline="test")
    if len(dataset) == 0:
        raise ValueError(f"{args.data_root}: no {args.split} images found for dataset {args.data}")
    num_classes = args.num_classes or dataset.num_classes
    model: nn.Module
    if onnx_model is not None:
        model = onnx_model
    else:
        if args.checkpoint is None:
            print(f"offseg eval: warning: no --checkpoint given, {args.model} is randomly initialised", file=sys.stderr)
        model = create_model(args.model, num_classes=num_classes, checkpoint=args.checkpoint)
    scale = choose_test_scale(model, args.scale, "eval")
    if scale is not None:
        dataset.set_test_scale(scale)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    # --- fast path (offseg.optimize); same logits within float32 rounding ---
    if not args.exact and onnx_model is None:
        from ..optimize import optimize_for_inference

        model = optimize_for_inference(model.eval())

    scales = tuple(args.scales) if args.scales else DEFAULT_TTA_SCALES
    described = (
        test_mode["mode"]
        if test_mode["mode"] == "whole"
        else (
            f"slide crop {test_mode['crop_size'][0]}x{test_mode['crop_size'][1]} stride "
            f"{test_mode['stride'][0]}x{test_mode['stride'][1]}"
        )
    )
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    print(
        f"{args.model} on {args.data} {args.split}: {count} images, {described}"
        + (f", TTA scales {list(scales)} + flip" if args.tta else "")
    )
    results = evaluate(
        model,
        dataset,
        **test_mode,
        tta=args.tta,
        scales=scales,
        progress=not args.no_progress,
        limit=args.limit,
        device=device,
        num_workers=args.workers,
        num_classes=num_classes,
    )
    class_names = list(getattr(dataset, "class_names", None) or [])
    if len(class_names) != num_classes:
        class_names = [str(i) for i in range(num_classes)]
    print(format_table(results, class_names))

    if args.json:
        report = {
            "model": args.model,
            "checkpoint": args.checkpoint,
            **({"onnx": args.onnx, "precision": onnx_model.precision} if onnx_model is not None else {}),
            "data": args.data,
            "data_root": str(args.data_root),
            "split": args.split,
            **test_mode,
            "tta": args.tta,
            "scales": list(scales) if args.tta else None,
            **results,
            "class_names": class_names,
            "per_class": [
                {"class": name, "IoU": iou, "Acc": acc}
                for name, iou, acc in zip(class_names, results["IoU"], results["Acc"], strict=True)
            ],
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
        print(f"results written to {out}")
    return 0
