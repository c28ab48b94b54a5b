"""`offseg convert`: an official (or training) checkpoint to the project's own format."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a checkpoint to the own format (OUT.safetensors + OUT.json)",
        description=(
            "Convert an official MMSegmentation checkpoint (or a checkpoint written by offseg train) to the "
            "project's own format: OUT.safetensors (weights, no pickle) and OUT.json (model name, classes, "
            "palette, normalisation). The checkpoint must fit the model exactly; otherwise the differing keys are "
            "listed. Pickles are read without executing code."
        ),
    )
    p.add_argument("input", metavar="IN.pth", help="checkpoint to convert")
    p.add_argument(
        "output", metavar="OUT", help="output path without suffix (OUT.safetensors and OUT.json are written)"
    )
    p.add_argument("--model", required=True, help="model the checkpoint belongs to (see offseg.list_models())")
    p.add_argument(
        "--dataset",
        help="dataset whose class names and palette to record (default: those the checkpoint carries, if any)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import infer_num_classes, load_checkpoint, read_checkpoint
    from ..factory import create_model
    from ..hub import save_pretrained

    info = read_checkpoint(args.input)
    saved_from = info.metadata.get("model_name")
    if saved_from and saved_from != args.model:
        raise ValueError(f"{args.input} holds weights of model {saved_from}, not {args.model}")
    num_classes = info.metadata.get("num_classes") or infer_num_classes(info.state_dict)
    class_names, palette = info.metadata.get("class_names"), info.metadata.get("palette")
    dataset = args.dataset
    if dataset is not None:
        from ..data import dataset_info

        dataset_classes = dataset_info(dataset).num_classes
        if num_classes is not None and num_classes != dataset_classes:
            raise ValueError(f"{args.input} has {num_classes} classes but dataset {dataset} has {dataset_classes}")
        num_classes = num_classes or dataset_classes
        class_names = palette = None  # the dataset's, filled in by save_pretrained
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        class_names = None  # the checkpoint's own record disagrees with its weights: do not pass it on
    if palette is not None and num_classes is not None and len(palette) < num_classes:
        palette = None

    model = create_model(args.model, num_classes=num_classes)
    load_checkpoint(model, info.state_dict, source=str(info.path))  # strict: lists the keys that differ
    weights = save_pretrained(model, args.output, class_names=class_names, palette=palette, dataset=dataset)
    size_mib = weights.stat().st_size / 2**20
    classes = f"{model.num_classes} classes" + (
        f" ({dataset})" if dataset else " (names recorded)" if class_names else ""
    )
    print(
        f"wrote {weights} ({len(model.state_dict())} tensors, {size_mib:.1f} MiB) and {weights.with_suffix('.json')}: "
        f"{args.model}, {classes}"
    )
    return 0
