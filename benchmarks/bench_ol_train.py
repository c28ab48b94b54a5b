"""Offset Learning in the eager training step: the official form against the regrouped one.

    python benchmarks/bench_ol_train.py [--model offseg-t] [--batch 2] [--size 512] [--rounds 7]

`OffsetLearning.forward` computes the masks as E W'^T + softmax_K(A) [(W P_f^T) W'^T] (the
per-pixel feature offsets are never formed); `forward_reference` forms them as the official code
does. This times one AdamW step of `offseg.benchmark`'s eager training row with each, alternated
`--rounds` times in one process (after one warm-up step of each), and Offset Learning's forward +
backward alone on the head's input size; it prints the medians and their ratios. Then the error
of the loss and every gradient of one step from the same weights against the reference row
(`offseg.optimize.reference_computation`), for both forms, and of the eager inference forward.
Threads: set OMP_NUM_THREADS (and pin with taskset on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from offseg.benchmark import Row, build_runner, relative_error
from offseg.models.layers.offset_learning import OffsetLearning

REGROUPED = OffsetLearning.forward
FORMS = {"official": OffsetLearning.forward_reference, "regrouped": REGROUPED}


def alternated(run: Callable[[], object], rounds: int) -> dict[str, float]:
    """Median seconds of run() with each form of OffsetLearning.forward, alternated."""
    times: dict[str, list[float]] = {name: [] for name in FORMS}
    for i in range(rounds + 1):
        for name, forward in FORMS.items():
            setattr(OffsetLearning, "forward", forward)  # noqa: B010
            start = time.perf_counter()
            run()
            if i > 0:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    setattr(OffsetLearning, "forward", REGROUPED)  # noqa: B010
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offseg-t")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp())
    row = Row(args.model, "eager", train=True, batch=args.batch, size=(args.size, args.size))
    print(f"{args.model} batch {args.batch} {args.size}x{args.size}, {torch.get_num_threads()} thread(s)")

    step = alternated(build_runner(row, workdir).run, args.rounds)
    ol = OffsetLearning(row.num_classes, 256).train()
    x = torch.randn(args.batch, 256, args.size // 4, args.size // 4, requires_grad=True)
    grad = torch.randn(args.batch, row.num_classes, args.size // 4, args.size // 4)
    alone = alternated(lambda: ol(x).backward(grad), args.rounds)
    for label, medians in (("train step", step), (f"OL fwd+bwd {tuple(x.shape)}", alone)):
        print(
            f"{label:<32} official {medians['official']:.3f} s  regrouped {medians['regrouped']:.3f} s  "
            f"ratio {medians['regrouped'] / medians['official']:.3f}"
        )

    ref = build_runner(Row(args.model, "reference", train=True, batch=args.batch, size=row.size), workdir).check()
    for name, forward in FORMS.items():
        setattr(OffsetLearning, "forward", forward)  # noqa: B010
        print(f"loss + gradients, {name}: max rel. error {relative_error(build_runner(row, workdir).check(), ref):.2e}")
    setattr(OffsetLearning, "forward", REGROUPED)  # noqa: B010
    logits = build_runner(Row(args.model, "eager", size=row.size), workdir).check()
    ref_logits = build_runner(Row(args.model, "reference", size=row.size), workdir).check()
    print(f"eager inference forward: max rel. error {relative_error(logits, ref_logits):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
