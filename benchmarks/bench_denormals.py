"""How much subnormal floats slow a trained model on CPU, and what flushing them to zero gains.

    python benchmarks/bench_denormals.py CHECKPOINT [CHECKPOINT ...] [--data-root ../shared/data/camvid]
                                         [--threads 1] [--reps 3]

CHECKPOINT: checkpoints of `offseg train` (they name their model), e.g. the CamVid study's
runs/camvid_study/<model>_s<seed>/last.pth. A model fresh from initialisation has no subnormals;
they appear as it trains (in FreqFusion's sampler: products with sigmoid tails), and every
operation on one is many times slower on x86 CPUs. For each checkpoint this prints how many
values each module outputs are subnormal, then times a training step (forward + backward) and
an inference forward on one real CamVid batch (8 crops of 160x160 at half resolution, as the
`camvid` recipe trains), alternating flush off / on `--reps` times in one process so machine
drift falls on both, and prints the medians and their ratio. `offseg` commands and
`offseg.engine.train` flush subnormals (torch.set_flush_denormal) because of this.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def subnormal_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, int, int]]:
    """(module name, subnormal values, values) of every module output holding subnormals."""
    tiny = torch.finfo(torch.float32).tiny
    found: list[tuple[str, int, int]] = []

    def hook(name: str):
        def record(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                count = int(((output != 0) & (output.abs() < tiny)).sum())
                if count:
                    found.append((name, count, output.numel()))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    torch.set_flush_denormal(False)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sorted(found, key=lambda f: -f[1])


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    F.cross_entropy(model(x), y, ignore_index=255).backward()
    model.zero_grad(set_to_none=True)


def eval_forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(x)


def timed(fn, reps: int) -> dict[bool, float]:
    """Median seconds of fn() with flushing off and on, alternated in one process."""
    fn()  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(reps):
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            start = time.perf_counter()
            fn()
            times[flush].append(time.perf_counter() - start)
    torch.set_flush_denormal(False)
    return {flush: statistics.median(t) for flush, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if not torch.set_flush_denormal(True):
        print("this CPU cannot flush subnormals (no SSE3): nothing to measure", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)

    import offseg
    from offseg.checkpoint import read_checkpoint
    from offseg.data import build_dataset

    data = build_dataset("camvid", args.data_root, "train", crop_size=(160, 160), scale=(240, 180))
    items = [data[i] for i in range(8)]
    x = torch.stack([item["image"] for item in items])
    y = torch.stack([item["label"] for item in items])

    print(f"one CamVid batch 8x3x160x160, {args.threads} thread(s), medians of {args.reps} alternated runs")
    print(
        f"{'checkpoint':<48} {'subnormal outputs':>18} {'step no-flush':>14} {'flush':>7} {'ratio':>6} "
        f"{'forward no-flush':>17} {'flush':>7} {'ratio':>6}"
    )
    for path in args.checkpoints:
        name = read_checkpoint(path).metadata.get("model_name")
        if not name:
            raise SystemExit(f"{path}: does not name its model (a checkpoint of offseg train is needed)")
        model = offseg.create_model(name, checkpoint=path)
        found = subnormal_outputs(model.eval(), x)
        total = sum(count for _, count, _ in found)

        train_t = timed(functools.partial(train_step, model, x, y), args.reps)
        eval_t = timed(functools.partial(eval_forward, model, x), args.reps)
        print(
            f"{str(path)[-48:]:<48} {total:>9} in {len(found):>2} mod. {train_t[False]:>12.2f} s "
            f"{train_t[True]:>5.2f} s "
            f"{train_t[False] / train_t[True]:>5.2f}x {eval_t[False]:>15.2f} s {eval_t[True]:>5.2f} s "
            f"{eval_t[False] / eval_t[True]:>5.2f}x"
        )
        for module, count, numel in found[:3]:
            print(f"    {module}: {count} of {numel} values subnormal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
