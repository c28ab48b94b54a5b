"""`offseg demo`: the whole flow on an embedded default that needs no download.

Generates a small street-scene dataset (or takes a real one), prints the model card, trains the
model for a few minutes on the CPU, evaluates it with a per-class table, and writes colour
overlays and an image | ground truth | prediction sheet. Re-running continues where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train -> evaluate -> predict on a generated dataset (no download), or on yours",
        description=__doc__,
    )
    p.add_argument("--out", default="runs/demo", help="output folder (data, checkpoints, overlays)")
    p.add_argument("--model", default="offseg-t")
    p.add_argument("--data", default="folder", help="dataset name; default: the generated street scenes")
    p.add_argument("--data-root", help="dataset root (default: generate OUT/data)")
    p.add_argument("--iters", type=int, help="training iterations (default: the recipe's)")
    p.add_argument("--images", type=int, default=6, help="validation images to draw overlays for")
    p.add_argument("--no-card", action="store_true", help="skip the model card (FLOPs and latency)")
    p.set_defaults(run=run)


def _model_card(model_name: str) -> None:
    try:
        from ..flops import format_model_card, model_card
    except ImportError:  # the card is a courtesy; training does not need it
        return
    print(format_model_card(model_card(model_name, size=(512, 512), num_classes=150)))


def _sheet(rows: list[tuple], path: Path) -> None:
    """Rows of (image, ground truth colours, prediction colours) side by side, one row per image."""
    from PIL import Image

    width = sum(im.width for im in rows[0])
    height = sum(row[0].height for row in rows)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for row in rows:
        x = 0
        for im in row:
            sheet.paste(im, (x, y))
            x += im.width
        y += row[0].height
    sheet.save(path)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from .. import create_model
    from ..data import build_dataset, generate_synthetic_dataset
    from ..engine.recipes import default_recipe_name, load_recipe, set_iterations
    from ..engine.trainer import train
    from ..evaluation import evaluate, format_table
    from ..predict import predict
    from ..visualize import colorize, overlay, palette_image

    out = Path(args.out)
    root = Path(args.data_root) if args.data_root else out / "data"
    if args.data_root is None:
        if not (root / "train").is_dir():
            print(f"generating the street-scene dataset in {root} ...")
            generate_synthetic_dataset(root, num_train=120, num_val=24, size=(128, 160), seed=0)
        args.data = "folder"
    if not args.no_card:
        _model_card(args.model)

    overrides = [f"data.name={args.data}", f"data.root={root}"]
    recipe = load_recipe(default_recipe_name(args.model, args.data), model=args.model, overrides=overrides)
    if args.iters:
        set_iterations(recipe, args.iters)
    work = out / "train"
    last = work / "last.pth"
    done = last.is_file() and torch.load(last, weights_only=True)["iteration"] >= recipe["train"]["iters"]
    if done:
        print(f"training already finished in {work}; delete it to train again")
    else:
        print(f"training {args.model} on {args.data} for {recipe['train']['iters']} iterations (work dir {work}) ...")
        train(recipe, work, resume=last.is_file())

    checkpoint = work / "best.pth" if (work / "best.pth").is_file() else last
    model = create_model(args.model, checkpoint=checkpoint).eval()
    val = build_dataset(
        args.data, root, recipe["data"]["val_split"], pipeline="test", **(recipe["data"].get("test_options") or {})
    )
    results = evaluate(model, val, progress=True, **recipe["test"])
    print(format_table(results, val.class_names))

    overlays = out / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(min(args.images, len(val))):
        image_path, label_path = val.samples[i]
        image = Image.open(image_path).convert("RGB")
        pred = predict(model, image, **recipe["test"])
        stem = Path(image_path).stem
        overlay(image, pred, val.palette).save(overlays / f"{stem}_overlay.png")
        palette_image(pred, val.palette).save(overlays / f"{stem}.png")
        truth = val.load(i)[1]
        rows.append((image, colorize(truth, val.palette), colorize(pred.astype(np.int64), val.palette)))
    _sheet(rows, out / "sheet.png")
    print(f"mIoU {results['mIoU']:.2f} on {len(val)} validation images")
    print(f"overlays: {overlays}/   image | ground truth | prediction: {out / 'sheet.png'}   checkpoint: {checkpoint}")
    return 0
