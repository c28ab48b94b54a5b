"""`offseg train`: run a recipe (packaged or a YAML file), on one process or under torchrun."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model with a recipe (resumable; torchrun for several processes)",
        description="Train a model. Every recipe field can be overridden with --set section.key=value.",
    )
    p.add_argument("--model", required=True, help="registered model name, e.g. offseg-t (see offseg info --list)")
    p.add_argument(
        "--data", required=True, help="dataset: ade20k, cityscapes, coco-stuff164k, pascal-context-59, camvid, folder"
    )
    p.add_argument("--data-root", required=True, help="dataset root folder")
    p.add_argument("--recipe", help="packaged recipe name or YAML file (default: the one for this model and dataset)")
    p.add_argument("--iters", type=int, help="total iterations")
    p.add_argument("--batch-size", type=int, help="total batch size over all processes and accumulation steps")
    p.add_argument("--accumulate", type=int, help="gradient-accumulation steps per iteration")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="training crop size")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--work-dir", default="work_dirs/run", help="where checkpoints (last.pth, best.pth) and logs go")
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/last.pth (its recipe wins)")
    p.add_argument("--pretrained-backbone", help="ImageNet backbone checkpoint to initialise from")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (CUDA; bf16 also on CPU)")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data-loading processes per training process")
    p.add_argument("--save-interval", type=int)
    p.add_argument("--val-interval", type=int, help="validate every N iterations (0: never)")
    p.add_argument("--val-limit", type=int, help="validate on the first N images only")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any recipe field, e.g. optimizer.lr=1e-4"
    )
    p.add_argument(
        "--log",
        choices=["jsonl", "tensorboard"],
        default="jsonl",
        help="jsonl: WORK_DIR/log.jsonl only (always written); tensorboard: also TensorBoard event files in "
        "WORK_DIR/tensorboard (pip install 'offseg[tensorboard]')",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def build_recipe(args: argparse.Namespace) -> dict:
    from ..engine.recipes import default_recipe_name, load_recipe, set_iterations

    overrides = [f"data.name={args.data}", f"data.root={args.data_root}"]
    flags = {
        "train.batch_size": args.batch_size,
        "train.accumulate": args.accumulate,
        "optimizer.lr": args.lr,
        "train.amp": args.amp,
        "train.seed": args.seed,
        "data.num_workers": args.workers,
        "train.save_interval": args.save_interval,
        "train.val_interval": args.val_interval,
        "train.val_limit": args.val_limit,
    }
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.crop:
        overrides.append(f"data.options.crop_size=[{args.crop[0]}, {args.crop[1]}]")
    overrides += args.set
    name = args.recipe or default_recipe_name(args.model, args.data)
    recipe = load_recipe(name, model=args.model, overrides=overrides)
    if args.iters is not None:
        set_iterations(recipe, args.iters)
    return recipe


def run(args: argparse.Namespace) -> int:
    from .._heap import keep_freed_heap
    from ..engine.trainer import train

    # Each step reuses the memory the previous one freed instead of faulting it in again
    # (benchmarks/bench_heap.py --train: OffSeg-T steps about 0.85-0.9x the time).
    keep_freed_heap()

    recipe = build_recipe(args)
    results = train(
        recipe,
        args.work_dir,
        resume=args.resume,
        pretrained_backbone=args.pretrained_backbone,
        device=args.device,
        progress=not args.no_progress,
        log_to=("jsonl", args.log),
    )["val"]
    if results:
        print(f"final val: mIoU {results['mIoU']:.2f}  mAcc {results['mAcc']:.2f}  aAcc {results['aAcc']:.2f}")
    from pathlib import Path

    written = [str(p) for p in (Path(args.work_dir) / "last.pth", Path(args.work_dir) / "best.pth") if p.is_file()]
    print(f"checkpoints: {', '.join(written)}")
    return 0
