"""`offseg analyze`: look inside the classifier.

offseg analyze ideal-repr   the paper's Fig. 3: ideal class representation W* = M (E^T)^+ per
                            image, the mIoU of the masks it recomputes, and how little W*_k
                            agrees across images (cosine-similarity maps), next to the model's W
offsets                     Offset Learning on single images: coupled attention, ||dE||, ||dW_k||
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._options import add_scale_argument, choose_test_scale


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="analyse class representations and offsets (ideal-repr, offsets)",
        description="Look inside the classifier: the ideal class representation of the paper's Fig. 3 "
        "(ideal-repr) and the offsets of Offset Learning (offsets). Figures need matplotlib.",
    )
    p.set_defaults(run=lambda args: _print_help(p))
    analyses = p.add_subparsers(dest="analysis", metavar="ANALYSIS")

    ideal = analyses.add_parser(
        "ideal-repr",
        help="ideal class representation W* = M (E^T)^+ per image; recomputed-mask mIoU; similarity maps",
        description="For each image: E = the features that feed the classifier / Offset Learning, at the head's "
        "resolution (1/4 for OffSeg, 1/8 for SegFormer-OL and SegNeXt); labels voted down to that grid by "
        "majority (ignored cells left out); W* = M (E^T)^+ by SVD least squares in float64. Reports the mIoU of "
        "argmax W* E^T and of the model's own prediction on the same grid, and writes per-class cosine-similarity "
        "maps of W*_k across the images, of the model's W_k and, for Offset Learning, of W_k + dW_k, with "
        "summary.json. Images are spread evenly over the split.",
    )
    _model_arguments(ideal)
    ideal.add_argument(
        "--data",
        required=True,
        help="dataset name: ade20k, cityscapes, coco-stuff164k, pascal-context-59, camvid, folder",
    )
    ideal.add_argument("--data-root", required=True, help="dataset root folder")
    ideal.add_argument("--split", default="val", help="split (default: val)")
    add_scale_argument(ideal, "the dataset's official test scale")
    ideal.add_argument(
        "--images",
        type=int,
        default=10,
        metavar="N",
        help="number of images, spread evenly over the split (default: 10)",
    )
    ideal.add_argument(
        "--classes",
        nargs="+",
        metavar="CLASS",
        help="classes (names or indices) to draw similarity maps for (default: every class in two or more images)",
    )
    ideal.add_argument(
        "--min-pixels",
        type=int,
        default=1,
        metavar="P",
        help="a class counts as present in an image from P labelled cells at head resolution (default: 1)",
    )
    ideal.add_argument(
        "--rcond",
        type=float,
        default=None,
        metavar="R",
        help="singular values below R x the largest count as zero in the pseudo-inverse (default: 1e-6)",
    )
    ideal.add_argument("--out", default="analysis/ideal-repr", help="output folder (default: analysis/ideal-repr)")
    ideal.set_defaults(run=run_ideal_repr)

    offsets = analyses.add_parser(
        "offsets",
        help="Offset Learning on images: coupled attention, feature- and class-offset norms",
        description="For each image, one PNG: the input, the prediction overlay, the coupled attention "
        "softmax_space(W E^T) of the top predicted classes (or --classes), the feature-offset norm ||dE|| per "
        "pixel and the class-offset norm ||dW_k|| per class; plus offsets.json. Offset Learning models only.",
    )
    offsets.add_argument("inputs", nargs="+", metavar="IMAGE", help="image file or folder (searched recursively)")
    _model_arguments(offsets)
    add_scale_argument(offsets, "none")
    offsets.add_argument(
        "--palette", metavar="DATASET", help="class names, colours and default class count of this dataset"
    )
    offsets.add_argument(
        "--classes", nargs="+", metavar="CLASS", help="classes (names or indices) whose attention to show"
    )
    offsets.add_argument(
        "--top",
        type=int,
        default=4,
        metavar="N",
        help="without --classes, show the N largest predicted classes (default: 4)",
    )
    offsets.add_argument("--out", default="analysis/offsets", help="output folder (default: analysis/offsets)")
    offsets.set_defaults(run=run_offsets)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name (see `offseg.list_models()`)")
    p.add_argument("--checkpoint", help="weights; without it the model is randomly initialised")
    p.add_argument("--num-classes", type=int, help="number of classes (default: the checkpoint's, else the dataset's)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random initialisation (no --checkpoint) and of SegNeXt's NMF bases (default: 0)",
    )


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _build_model(args: argparse.Namespace, num_classes: int | None):
    import torch

    from ..factory import create_model

    if args.checkpoint is None:
        print(f"offseg analyze: warning: no --checkpoint given, {args.model} is randomly initialised", file=sys.stderr)
    torch.manual_seed(args.seed)  # before building: a randomly initialised model is reproducible too
    model = create_model(args.model, num_classes=num_classes, checkpoint=args.checkpoint)
    set_generator = getattr(model.decode_head, "set_generator", None)
    if set_generator is not None:
        set_generator(args.seed)  # the same NMF bases for every image
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval()


def run_ideal_repr(args: argparse.Namespace) -> int:
    from ..analysis import DEFAULT_RCOND, analyze_ideal_representation, evenly_spaced, plot_ideal_repr, resolve_classes
    from ..data import build_dataset

    if args.images < 1:
        raise ValueError("--images must be at least 1")
    if args.min_pixels < 1:
        raise ValueError("--min-pixels must be at least 1")
    rcond = DEFAULT_RCOND if args.rcond is None else args.rcond
    if not 0 <= rcond < 1:
        raise ValueError("--rcond must lie in [0, 1)")
    dataset = build_dataset(args.data, args.data_root, args.split, pipeline="test")
    if len(dataset) == 0:
        raise ValueError(f"{args.data_root}: no {args.split} images found for dataset {args.data}")
    classes = resolve_classes(args.classes, dataset.class_names)
    model = _build_model(args, args.num_classes or dataset.num_classes)
    scale = choose_test_scale(model, args.scale, "analyze")
    if scale is not None:
        dataset.set_test_scale(scale)
    if model.num_classes != dataset.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes but {args.data} has {dataset.num_classes}")
    _check_matplotlib()
    indices = evenly_spaced(args.images, len(dataset))
    print(f"{args.model} on {args.data} {args.split}: {len(indices)} images")
    analysis = analyze_ideal_representation(
        model, dataset, indices, classes=classes, rcond=rcond, min_pixels=args.min_pixels, progress=True
    )
    summary = plot_ideal_repr(
        analysis,
        args.out,
        palette=dataset.palette,
        metadata={"checkpoint": args.checkpoint, "data": args.data, "split": args.split},
    )

    print(
        f"features: {summary['feature_channels']} channels at 1/{analysis.stride}, numerical rank "
        f"{min(analysis.feature_rank)}-{max(analysis.feature_rank)} (rcond {rcond:g})"
    )
    print(
        f"mIoU at head resolution: recomputed argmax W* E^T {_pct(summary['ideal_mIoU'])}, model "
        f"{_pct(summary['model_mIoU'])}"
    )
    aligned = analysis.aligned_repr is not None
    print(
        "mean off-diagonal cosine similarity per class: ideal W*"
        + (" | model W + dW" if aligned else "")
        + " (model W: 1 by construction)"
    )
    for entry in summary["classes"]:
        line = f"  {entry['name']:<16} {len(entry['images']):>3} images  {_num(entry['ideal_mean_similarity'])}"
        if aligned:
            line += f" | {_num(entry['aligned_mean_similarity'])}"
        print(line)
    print(f"wrote {len(summary['files'])} files to {args.out}")
    return 0


def run_offsets(args: argparse.Namespace) -> int:
    import numpy as np

    from ..analysis import classifier_kind, offset_quantities, plot_offsets, resolve_classes
    from ..predict import IMAGE_EXTENSIONS, collect_inputs, load_image

    files = [(path, stem) for path, stem in collect_inputs(args.inputs) if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError("no image files found in " + ", ".join(args.inputs))
    if args.top < 1:
        raise ValueError("--top must be at least 1")
    info = None
    if args.palette:
        from ..data import dataset_info

        info = dataset_info(args.palette)
    num_classes = args.num_classes
    if num_classes is None and args.checkpoint is None and info is not None:
        num_classes = len(info.class_names)
    model = _build_model(args, num_classes)
    if classifier_kind(model) != "offset":
        raise ValueError(f"{args.model} has a per-pixel classifier: no offsets to show (use an Offset Learning model)")
    class_names = list(getattr(model, "class_names", None) or (info.class_names if info is not None else []))
    if len(class_names) != model.num_classes:
        class_names = [str(k) for k in range(model.num_classes)]
    palette = getattr(model, "palette", None)
    if palette is None and info is not None:
        palette = info.palette
    classes = resolve_classes(args.classes, class_names)
    _check_matplotlib()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "checkpoint": args.checkpoint, "images": {}}
    from ..data.transforms import fit_size, resize_image

    scale = choose_test_scale(model, args.scale, "analyze")
    for path, stem in files:
        image = np.asarray(load_image(path))
        if scale is not None:
            height, width = image.shape[:2]
            image = resize_image(image, fit_size(height, width, scale))
        quantities = offset_quantities(model, image)
        target = out / stem.parent / f"{stem.name}_offsets.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        figures = plot_offsets(
            image,
            quantities,
            target,
            class_names=class_names,
            palette=palette,
            classes=classes,
            top=args.top,
            title=f"{args.model}: {path.name}",
        )
        report["images"][str(path)] = {"figure": str(target), **figures}
        print(f"{path} -> {target}")
    (out / "offsets.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _check_matplotlib() -> None:
    # Fail before the slow part, not after it.
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ValueError("figures need matplotlib: pip install 'offseg[plot]' (or pip install matplotlib)") from err


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _num(value) -> str:
    return "   n/a" if value is None else f"{value:6.3f}"
