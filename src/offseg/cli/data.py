"""`offseg data`: prepare, check, describe and generate datasets.

offseg data prepare cityscapes ROOT        labelIds -> labelTrainIds
offseg data prepare coco-stuff164k ROOT    stuffthingmaps -> labelTrainIds
offseg data check NAME ROOT [--split S]    every problem in one pass; exit 1 if any
offseg data info NAME                      classes, colours and default sizes
offseg data synthetic ROOT                 write the procedural street-scene demo set
"""

from __future__ import annotations

import argparse
import sys

DATASET_CHOICES = ("ade20k", "cityscapes", "coco-stuff164k", "pascal-context-59", "camvid", "folder")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="prepare, check and generate datasets",
        description="Prepare, check, describe and generate segmentation datasets.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(run=lambda args: _help(parser))

    prepare = actions.add_parser("prepare", help="convert a downloaded dataset's labels to train ids")
    prepare.add_argument("dataset", choices=("cityscapes", "coco-stuff164k"))
    prepare.add_argument("root", help="dataset root (the folder holding gtFine/, or images/ and annotations/)")
    prepare.add_argument("--workers", type=int, default=0, help="processes to convert with (default: this one)")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.set_defaults(run=run_prepare)

    check = actions.add_parser("check", help="report every problem of a dataset on disk (exit 1 if any)")
    check.add_argument("dataset", choices=DATASET_CHOICES)
    check.add_argument("root", help="dataset root")
    check.add_argument("--split", help="check only this split (default: the dataset's usual splits)")
    check.add_argument("--num-classes", type=int, help="folder datasets without a classes.txt: number of classes")
    check.add_argument("--classes-file", help="folder datasets: class names file (default ROOT/classes.txt)")
    check.add_argument("--max-report", type=int, default=50, metavar="N", help="print at most N problems (default 50)")
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    check.set_defaults(run=run_check)

    info = actions.add_parser("info", help="classes, colours and default sizes of a dataset")
    info.add_argument("dataset", help="dataset name (also 'synthetic'), or a folder dataset's root or classes file")
    info.set_defaults(run=run_info)

    synth = actions.add_parser("synthetic", help="write the procedural street-scene dataset (folder layout)")
    synth.add_argument("root", help="output folder")
    synth.add_argument("--num-train", type=int, default=80)
    synth.add_argument("--num-val", type=int, default=20)
    synth.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"))
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=run_synthetic)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def run_prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare_cityscapes, prepare_coco_stuff164k

    convert = prepare_cityscapes if args.dataset == "cityscapes" else prepare_coco_stuff164k
    written = convert(args.root, workers=args.workers, progress=not args.no_progress)
    print(f"wrote {written} train-id label files under {args.root}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from ..data.check import check_dataset

    options = {}
    if args.num_classes is not None:
        options["num_classes"] = args.num_classes
    if args.classes_file is not None:
        options["classes_file"] = args.classes_file
    report = check_dataset(args.dataset, args.root, split=args.split, progress=not args.no_progress, **options)
    for note in report.skipped:
        print(f"skipped: {note}")
    for problem in report.problems[: args.max_report]:
        print(f"problem: {problem}")
    if len(report.problems) > args.max_report:
        print(f"... and {len(report.problems) - args.max_report} more problems")
    checked = ", ".join(f"{split} {count}" for split, count in report.checked.items()) or "nothing"
    if report.ok:
        print(f"{args.dataset} at {args.root}: OK ({checked} image/label pairs checked)")
        return 0
    print(
        f"{args.dataset} at {args.root}: {len(report.problems)} problem(s) ({checked} pairs checked)", file=sys.stderr
    )
    return 1


def run_info(args: argparse.Namespace) -> int:
    from ..data import dataset_info

    info = dataset_info(args.dataset)
    print(f"{info.name}: {info.num_classes} classes, ignore index {info.ignore_index}")
    if info.crop_size or info.scale:
        print(
            f"train: crop {info.crop_size}, base scale (w, h) {info.scale}; test scale (w, h) "
            f"{info.test_scale or 'unchanged'}"
        )
    labels = []
    if info.reduce_zero_label:
        labels.append("0 -> ignore, i -> i-1 (reduce_zero_label)")
    if info.void_value is not None:
        labels.append(f"{info.void_value} -> ignore")
    if labels:
        print("raw labels: " + "; ".join(labels))
    # a palette may hold more colours than there are classes; the extra ones are unused
    for index, (name, colour) in enumerate(zip(info.class_names, info.palette.tolist(), strict=False)):
        print(f"{index:4d}  {name:<24s} #{colour[0]:02x}{colour[1]:02x}{colour[2]:02x}")
    return 0


def run_synthetic(args: argparse.Namespace) -> int:
    from ..data import generate_synthetic_dataset

    root = generate_synthetic_dataset(
        args.root, num_train=args.num_train, num_val=args.num_val, size=tuple(args.size), seed=args.seed
    )
    print(f"wrote {args.num_train} train and {args.num_val} val images ({args.size[0]}x{args.size[1]}) to {root}")
    return 0
