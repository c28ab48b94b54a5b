"""Is the data pipeline fast enough to keep a CPU training step busy?

Measures, on CamVid (or any dataset `build_dataset` reads):
  1. training-pipeline throughput (samples/s) through a DataLoader with 0 and 2 workers;
  2. the time of one OffSeg-T training step (forward + backward + AdamW) at the same crop and
     batch size;
and prints their ratio: the share of a step that loading its batch would take in the main
process. Below 1 the pipeline keeps up even without workers.

    python benchmarks/bench_data.py                 # CamVid, crop 512, batch 2
    python benchmarks/bench_data.py --crop 352 480 --batch 4 --workers 0 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from offseg import create_model
from offseg.data import InfiniteSampler, build_dataset, worker_init_fn


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
    args = parser.parse_args(argv)
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
