"""Is the data pipeline fast enough to keep a CPU training step busy?

Measures, on CamVid (or any dataset `build_dataset` reads):
  1. training-pipeline throughput (samples/s) through a DataLoader with 0 and 2 workers;
  2. the time of one OffSeg-T training step (forward + backward + AdamW) at the same crop and
     batch size;
and prints their ratio: the share of a step that loading its batch would take in the main
process. Below 1 the pipeline keeps up even without workers.

With ``--synthetic``, measures instead the per-sample time of the training pipeline alone
(random resize, crop, flip, photometric distortion, normalise; no file decoding) at the paper's
dataset sizes, on generated images, in this process (one thread):
  ade         ADE20K-size image 683x512, scale (2048, 512), ratio 0.5-2.0, crop 512
  cityscapes  2048x1024, scale (2048, 1024), ratio 0.5-2.0, crop 1024
Every round runs the same fixed seeds (the same resize sizes and crops); the figure is the
median over rounds of the mean time per sample.

    python benchmarks/bench_data.py                 # CamVid, crop 512, batch 2
    python benchmarks/bench_data.py --crop 352 480 --batch 4 --workers 0 2
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_data.py --synthetic ade cityscapes

``--baseline-src DIR`` times another source tree's pipeline in the same process, in turns with
this one, and prints the ratio: e.g. the hand-written NumPy resize / HSV of commit 1d13b46 against
OpenCV (see docs/data.md for the figures):

    mkdir -p /tmp/offseg-numpy && git archive 1d13b46 src | tar -x -C /tmp/offseg-numpy
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_data.py --synthetic ade cityscapes \
        --baseline-src /tmp/offseg-numpy/src
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from offseg import create_model
from offseg.data import InfiniteSampler, TrainPipeline, build_dataset, worker_init_fn

# name -> (image (H, W), pipeline scale (w, h), crop (h, w)); ratio range 0.5-2.0 for both
SYNTHETIC_SIZES = {
    "ade": ((512, 683), (2048, 512), (512, 512)),
    "cityscapes": ((1024, 2048), (2048, 1024), (1024, 1024)),
}


def synthetic_sample(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random colour image and a label of 19 horizontal bands (so that the crop's
    class-ratio rule has several classes to count)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    image = np.repeat(np.repeat(coarse, 64, axis=0), 64, axis=1)[:height, :width]
    image = np.ascontiguousarray(image ^ rng.integers(0, 16, (height, width, 3), dtype=np.uint8))
    label = (np.arange(height)[:, None] * 19 // height).repeat(width, axis=1).astype(np.uint8)
    return image, label


def load_baseline_pipeline(source: str) -> type:
    """`TrainPipeline` of another offseg source tree (e.g. an older commit, exported with
    ``git archive REV src | tar -x -C DIR``; pass DIR/src), imported beside this one."""
    data_dir = Path(source) / "offseg" / "data"
    if not (data_dir / "transforms.py").is_file():
        raise SystemExit(f"--baseline-src {source}: no offseg/data/transforms.py there")
    package = types.ModuleType("offseg_baseline_data")
    package.__path__ = [str(data_dir)]  # its relative imports (.labels) resolve in that tree
    sys.modules[package.__name__] = package
    return importlib.import_module(f"{package.__name__}.transforms").TrainPipeline


def pipeline_sample_times(name: str, pipelines: dict[str, type], seeds: int, rounds: int) -> dict[str, float]:
    """Per pipeline class: the median over `rounds` of the mean seconds per sample on `seeds`
    draws. The classes take turns within each round (A, B, A, B, ...), so a noisy machine
    affects both alike."""
    (height, width), scale, crop = SYNTHETIC_SIZES[name]
    image, label = synthetic_sample(height, width)
    built = {key: cls(crop_size=crop, scale=scale, ratio_range=(0.5, 2.0)) for key, cls in pipelines.items()}
    for pipeline in built.values():
        pipeline(image, label, np.random.default_rng(0))  # warm-up
    means: dict[str, list[float]] = {key: [] for key in built}
    for _ in range(rounds):
        for key, pipeline in built.items():
            start = time.perf_counter()
            for seed in range(seeds):
                pipeline(image, label, np.random.default_rng(seed))
            means[key].append((time.perf_counter() - start) / seeds)
    return {key: statistics.median(values) for key, values in means.items()}


def pipeline_throughput(dataset, batch_size: int, workers: int, samples: int, seed: int = 0) -> float:
    """Samples per second once the loader is running (the first batch, which includes the
    worker start-up, is not timed)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InfiniteSampler(dataset, seed=seed),
        num_workers=workers,
        worker_init_fn=worker_init_fn if workers else None,
    )
    batches = iter(loader)
    next(batches)
    count = max(1, samples // batch_size)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    elapsed = time.perf_counter() - start
    del batches
    return count * batch_size / elapsed


def train_step_time(dataset, batch_size: int, steps: int, model_name: str = "offseg-t") -> float:
    """Seconds per training step on CPU (after one warm-up step)."""
    model = create_model(model_name, num_classes=dataset.num_classes).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)
    items = [dataset[(i, 0)] for i in range(batch_size)]
    images = torch.stack([item["image"] for item in items])
    labels = torch.stack([item["label"] for item in items])

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels, ignore_index=255)
        loss.backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="camvid")
    parser.add_argument("--root", default="/work/shared/data/camvid")
    parser.add_argument(
        "--crop", type=int, nargs="+", default=[512], metavar="N", help="crop size: N or H W (default 512)"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--samples", type=int, default=48, help="samples timed per loader")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--synthetic",
        nargs="+",
        choices=sorted(SYNTHETIC_SIZES),
        help="time the training pipeline alone at these dataset sizes, on generated images",
    )
    parser.add_argument("--seeds", type=int, default=16, help="--synthetic: samples (seeds) per round")
    parser.add_argument("--rounds", type=int, default=5, help="--synthetic: rounds (the median is printed)")
    parser.add_argument(
        "--baseline-src",
        metavar="DIR",
        help="--synthetic: also time the TrainPipeline of this other offseg source tree (its src/), in turns",
    )
    args = parser.parse_args(argv)
    if args.synthetic:
        torch.set_num_threads(1)
        cv2.setNumThreads(1)  # as in a DataLoader worker (offseg.data.worker_init_fn)
        pipelines = {"this tree": TrainPipeline}
        if args.baseline_src:
            pipelines["baseline"] = load_baseline_pipeline(args.baseline_src)
        for name in args.synthetic:
            (height, width), scale, crop = SYNTHETIC_SIZES[name]
            times = pipeline_sample_times(name, pipelines, args.seeds, args.rounds)
            print(f"train pipeline, {name} ({width}x{height}, scale {scale}, ratio 0.5-2.0, crop {crop[0]}):")
            for key, seconds in times.items():
                print(f"  {key:10s} {seconds * 1000:7.1f} ms/sample")
            if "baseline" in times:
                print(f"  baseline / this tree: {times['baseline'] / times['this tree']:.2f}x")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    crop = (args.crop[0], args.crop[0]) if len(args.crop) == 1 else tuple(args.crop[:2])
    dataset = build_dataset(args.dataset, args.root, "train", crop_size=crop, seed=0)
    print(
        f"{args.dataset} train: {len(dataset)} images, crop {crop[0]}x{crop[1]}, batch {args.batch}, "
        f"torch threads {torch.get_num_threads()}"
    )

    rates = {}
    for workers in args.workers:
        rates[workers] = pipeline_throughput(dataset, args.batch, workers, args.samples)
        print(f"pipeline, {workers} workers: {rates[workers]:7.1f} samples/s  ({1000 / rates[workers]:6.1f} ms/sample)")

    step = train_step_time(dataset, args.batch, args.steps)
    print(f"OffSeg-T train step (fwd+bwd+AdamW): {step:.3f} s/step  ({step / args.batch * 1000:.0f} ms/sample)")
    for workers, rate in rates.items():
        load = args.batch / rate
        print(
            f"ratio load/step, {workers} workers: {load / step:.3f}  "
            f"(batch loads in {load * 1000:.0f} ms vs {step * 1000:.0f} ms step)"
        )


if __name__ == "__main__":
    main()
