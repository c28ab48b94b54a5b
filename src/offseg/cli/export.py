"""`offseg export`: a model (with or without weights) to an ONNX file, checked in ONNX Runtime."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX (checked against PyTorch in ONNX Runtime)",
        description=(
            "Export a model to ONNX. The graph's input is 'image' (B, 3, H, W): float32 RGB normalised with the "
            "ImageNet mean / std, or with --raw-input uint8 RGB 0-255. The output is 'logits' float32 (B, K, H, W) "
            "at the input size, or with --labels 'labels' int64 (B, H, W). The file is checked with onnx.checker "
            "and run once in ONNX Runtime against PyTorch (the max relative error is printed). "
            "Needs: pip install 'offseg[export]'."
        ),
    )
    p.add_argument("output", metavar="OUT.onnx", help="file to write")
    p.add_argument("--model", required=True, help="model name (see offseg.list_models())")
    p.add_argument(
        "--checkpoint",
        help="weights (official, training or own-format checkpoint); without it the "
        "model is randomly initialised (a warning is printed)",
    )
    p.add_argument("--num-classes", type=int, help="number of classes (default: the checkpoint's, else 150)")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="output format (default: onnx)")
    p.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        default=(512, 512),
        help="input height and width, multiples of 32 (default: 512 512); with --dynamic, the size "
        "traced and checked first",
    )
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="dynamic batch, height and width (H, W multiples of 32); checked at a second size too. "
        "Uses the dynamo exporter (opset >= 18) and can take minutes",
    )
    p.add_argument(
        "--labels",
        action="store_true",
        help="output 'labels': the argmax class index per pixel, int64 (B, H, W), instead of 'logits'",
    )
    p.add_argument(
        "--raw-input",
        action="store_true",
        help="input 'image' is uint8 RGB 0-255 (B, 3, H, W) and the mean / std normalisation happens "
        "inside the graph (default: float32, already normalised)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=17,
        help="ONNX opset, 17 or newer (default: 17; the dynamo exporter writes at least 18)",
    )
    p.add_argument(
        "--exporter",
        choices=("auto", "torchscript", "dynamo"),
        default="auto",
        help="torch exporter: auto = torchscript for a fixed size, dynamo for --dynamic (default)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime comparison")
    p.add_argument(
        "--no-sidecar",
        action="store_true",
        help="do not write OUT.json, the sidecar (model, classes, palette, test scale and mode, input size, the "
        "file's sha256) that `offseg eval --onnx` and `offseg predict --onnx` read",
    )
    p.add_argument("--verbose", action="store_true", help="show the exporter's own progress messages")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import infer_num_classes, load_checkpoint, read_checkpoint
    from ..export import export_onnx
    from ..factory import create_model

    metadata: dict[str, Any] = {}
    test_scale = None
    num_classes = args.num_classes
    info = None
    if args.checkpoint is not None:
        info = read_checkpoint(args.checkpoint)
        saved_from = info.metadata.get("model_name")
        if saved_from and saved_from != args.model:
            raise ValueError(f"{args.checkpoint} holds weights of model {saved_from}, not {args.model}")
        found = info.metadata.get("num_classes") or infer_num_classes(info.state_dict)
        if num_classes is not None and found is not None and found != num_classes:
            raise ValueError(
                f"{args.checkpoint}: checkpoint has {found} classes but --num-classes {num_classes} was given"
            )
        num_classes = num_classes or found
        metadata = {k: info.metadata[k] for k in ("class_names", "palette", "dataset") if k in info.metadata}
        test_scale = info.metadata.get("test_scale")
    else:
        print(f"offseg export: warning: no --checkpoint given, {args.model} is randomly initialised", file=sys.stderr)
    model = create_model(args.model, num_classes=num_classes)
    if info is not None:
        load_checkpoint(model, info.state_dict, source=str(info.path))
    if args.dynamic:
        print("offseg export: dynamic shapes: exporting with symbolic sizes, this can take minutes", file=sys.stderr)
    try:
        result = export_onnx(
            model,
            args.output,
            tuple(args.size),
            dynamic=args.dynamic,
            labels=args.labels,
            raw_input=args.raw_input,
            opset=args.opset,
            exporter=args.exporter,
            check=not args.no_check,
            metadata=metadata,
            verbose=args.verbose,
        )
    except ImportError as err:
        raise ValueError(str(err)) from None
    print(result.describe())
    if not args.no_sidecar:
        from ..inference import default_test_mode
        from ..onnx_model import write_sidecar

        dataset = metadata.get("dataset")
        sidecar = write_sidecar(
            result.path,
            model_name=args.model,
            num_classes=result.num_classes,
            precision="fp32",
            size=None if args.dynamic else result.size,
            size_divisor=int(getattr(model, "size_divisor", 32)),
            dataset=dataset,
            class_names=metadata.get("class_names"),
            palette=metadata.get("palette"),
            test_scale=test_scale,
            test_mode=default_test_mode(args.model, dataset or "folder"),
            raw_input=args.raw_input,
            labels=args.labels,
        )
        print(f"wrote {sidecar} (sidecar)")
    for note in result.notes:
        print(f"  note: {note}")
    for check in result.checks:
        print(f"  ONNX Runtime check, {check}")
    return 0
