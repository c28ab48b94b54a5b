"""`offseg predict`: label PNGs and colour overlays for images, folders and videos."""

from __future__ import annotations

import argparse
import sys
from itertools import islice
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
        "predict",
        help="segment images, folders or videos; write label PNGs and colour overlays",
        description="Segment images, folders (searched recursively) or video files. For an image NAME it "
        "writes NAME.png (palette PNG whose pixel values are the class indices) and NAME_overlay.png. For a "
        "video it writes NAME_overlay.mp4, or with --video-frames a folder NAME/ of per-frame label and "
        "overlay PNGs. Unreadable files are reported and skipped. Under torchrun the inputs are split "
        "across the processes by rank (every WORLD_SIZE-th file each; one GPU per process on CUDA).",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or video file")
    p.add_argument("--model", help="model name (see `offseg.list_models()`); required unless --onnx is given")
    p.add_argument("--checkpoint", help="weights; without it the model is randomly initialised")
    add_onnx_argument(p)
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--palette", metavar="DATASET", help="colours (and default class count / test mode) of this dataset")
    p.add_argument(
        "--num-classes",
        type=int,
        help="number of classes (default: checkpoint's, else the --palette dataset's, else 150)",
    )
    add_test_mode_arguments(p, "the official one for the --palette dataset, else whole")
    p.add_argument("--tta", action="store_true", help="multi-scale + horizontal-flip test-time augmentation")
    add_scale_argument(p, "none")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colours (default: 0.5)")
    p.add_argument(
        "--video-frames", action="store_true", help="for videos, write per-frame PNGs instead of an overlay video"
    )
    p.add_argument("--max-frames", type=int, metavar="N", help="segment at most N frames of each video")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0, help="seed of the global RNG (SegNeXt draws its NMF bases from it)")
    p.add_argument(
        "--exact",
        action="store_true",
        help="run the model as built instead of its inference-optimised copy (offseg.optimize_for_inference)",
    )
    p.set_defaults(run=run)


def _palette(args: argparse.Namespace, num_classes: int):
    import numpy as np

    from ..visualize import default_palette

    colours = np.zeros((0, 3), dtype=np.uint8)
    if args.palette:
        try:
            from ..data import dataset_info
        except ImportError as err:
            raise ValueError(f"--palette needs the data layer (offseg.data): {err}") from err
        colours = np.asarray(dataset_info(args.palette).palette, dtype=np.uint8).reshape(-1, 3)
    if len(colours) < num_classes:  # classes the dataset gives no colour get fixed random ones
        colours = np.concatenate([colours, default_palette(num_classes)[len(colours) :]])
    return colours


def _test_mode(args: argparse.Namespace) -> dict:
    from .eval import resolve_test_mode

    return resolve_test_mode(
        argparse.Namespace(
            model=args.model, data=args.palette or "folder", mode=args.mode, crop=args.crop, stride=args.stride
        )
    )


def run(args: argparse.Namespace) -> int:
    from .._heap import keep_freed_heap

    # Each forward reuses the memory the previous one freed instead of faulting it in again
    # (benchmarks/bench_heap.py: OffSeg-T 512x512 forwards about 0.9x the time).
    keep_freed_heap()
    import torch
    import torch.nn as nn
    from tqdm import tqdm

    from ..engine.distributed import all_reduce_sum, cleanup, init_distributed
    from ..factory import create_model
    from ..models.segmentor import num_classes_of
    from ..predict import (
        VideoWriter,
        collect_inputs,
        is_video,
        iter_video_frames,
        label_image,
        load_image,
        predict,
        shard_inputs,
        video_frame_rate,
    )
    from ..visualize import overlay

    files = collect_inputs(args.inputs)  # missing inputs fail here, before the model is built
    if not files:
        raise ValueError("no image or video files found in " + ", ".join(args.inputs))
    onnx_model = load_onnx_model(args, "predict") if args.onnx else None
    if args.model is None:
        raise ValueError("give --model (or --onnx)")
    # Under torchrun each process takes its share of the files and writes their outputs itself.
    dist_info = init_distributed(args.device)
    files = shard_inputs(files, dist_info.rank, dist_info.world_size)
    test_mode = _test_mode(args)
    if onnx_model is not None and args.mode is None and not args.crop and not args.palette:
        test_mode = dict(onnx_model.test_mode)  # the sidecar's
    num_classes = args.num_classes
    if num_classes is None and args.checkpoint is None and args.palette:
        from ..data import dataset_info

        num_classes = len(dataset_info(args.palette).class_names)
    model: nn.Module
    if onnx_model is not None:
        model = onnx_model
    else:
        if args.checkpoint is None and dist_info.is_main:
            print(
                f"offseg predict: warning: no --checkpoint given, {args.model} is randomly initialised", file=sys.stderr
            )
        model = create_model(args.model, num_classes=num_classes, checkpoint=args.checkpoint)
    scale = choose_test_scale(model, args.scale, "predict")
    torch.manual_seed(args.seed)
    device = dist_info.device if dist_info.enabled else torch.device(args.device or dist_info.device.type)
    model.to(device).eval()
    # --- fast path (offseg.optimize); same logits within float32 rounding ---
    if not args.exact and onnx_model is None:
        from ..optimize import optimize_for_inference

        model = optimize_for_inference(model.eval())
    palette = _palette(args, num_classes_of(model))
    if onnx_model is not None and onnx_model.palette and not args.palette:
        palette[: len(onnx_model.palette)] = onnx_model.palette[: len(palette)]  # the sidecar's colours
    out_root = Path(args.out)
    options = dict(**test_mode, tta=args.tta, scale=scale, fast=onnx_model is None)

    def segment(image, label_path: Path | None, overlay_path: Path):
        label = predict(model, image, **options)
        overlay_path.parent.mkdir(parents=True, exist_ok=True)
        if label_path is not None:
            label_image(label, palette).save(label_path)
        overlay(image, label, palette, alpha=args.alpha).save(overlay_path)

    written = failed = 0
    quiet = args.no_progress or not dist_info.is_main
    bar = tqdm(files, desc="predict", unit="file", disable=quiet, file=sys.stderr, dynamic_ncols=True)
    for source, stem in bar:
        target = out_root / stem
        try:
            if is_video(source):
                frames = islice(iter_video_frames(source), args.max_frames)  # None: every frame
                with tqdm(
                    frames,
                    desc=source.name,
                    unit="frame",
                    leave=False,
                    disable=quiet,
                    file=sys.stderr,
                    dynamic_ncols=True,
                ) as frames:
                    if args.video_frames:
                        for index, frame in enumerate(frames):
                            segment(frame, target / f"frame_{index:06d}.png", target / f"frame_{index:06d}_overlay.png")
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with VideoWriter(
                            target.parent / f"{target.name}_overlay.mp4", rate=video_frame_rate(source)
                        ) as writer:
                            for frame in frames:
                                writer.write(
                                    overlay(frame, predict(model, frame, **options), palette, alpha=args.alpha)
                                )
            else:
                label_path = target.parent / f"{target.name}.png"
                if label_path.resolve() == source.resolve():
                    raise ValueError("the label PNG would overwrite the input; choose another --out")
                segment(load_image(source), label_path, target.parent / f"{target.name}_overlay.png")
            written += 1
        except Exception as err:  # one bad file must not stop the batch
            failed += 1
            reason = str(err)
            if not reason.startswith(str(source)):
                reason = f"{source}: {reason}"
            tqdm.write(f"offseg predict: skipped {reason}", file=sys.stderr)
    if dist_info.enabled:
        print(
            f"offseg predict: rank {dist_info.rank}/{dist_info.world_size}: {written} file(s) written, {failed} skipped"
        )
        written, failed = (int(n) for n in all_reduce_sum(torch.tensor([written, failed])))
        cleanup()
    if dist_info.is_main:
        print(f"{written} file(s) written to {out_root}, {failed} skipped")
    return 0 if failed == 0 else 1
