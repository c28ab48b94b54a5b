"""CamVid study, round 2: does the head's learning rate or the starting point explain round 1?

    python benchmarks/camvid_round2.py [--data-root ../shared/data/camvid] [--out runs/camvid_round2]
                                       [--jobs J] [--runs N] [--pretrain-only] [--report-only]

Round 1 (benchmarks/camvid_study.py, docs/results-camvid.md) trained from scratch with the paper's
rule that parameters named `head` learn at 10x the base rate, and Offset Learning scored below the
per-pixel classifier. This round is a 2x2 design on the main pair, fixed before its first run
(issue #20) and not changed after:

| arm     | head learning rate                         | starting point                 | runs          |
|---------|--------------------------------------------|--------------------------------|---------------|
| round 1 | 10x (the paper's rule)                     | from scratch                   | reused, 0-2   |
| A       | 1x: the `head` rule's lr_mult set to 1     | from scratch                   | 6             |
| B       | 10x                                        | pretrained stand-in            | 6             |
| C       | 1x                                         | pretrained stand-in            | 6             |

- Variants `offseg-t-pixel` and `offseg-t`; seeds 0, 1, 2 in every cell, decided now, none added
  later. Everything else is round 1's `camvid` recipe (base lr 6e-4, 1000 iterations, crop 160,
  batch 8); the model is chosen on val and reported on test. The `head` rule's lr_mult = 1 applies
  to whatever the rule matches; as in round 1 that includes the backbone's `talking_head*` convs.
- Pretrained stand-in (no ImageNet weights can be had here): `offseg-t-pixel` trained once on a
  fresh set of the project's generated street scenes (4000 train / 200 val images of 180x240,
  generator seed 1, so none is one of the demo's), with the `camvid` recipe's augmentation and
  optimiser, for a budget fixed now: 4000 iterations, crop 160, batch 8, training seed 0. Its
  backbone at the last iteration (not the best on val) is kept as fp16 safetensors in
  benchmarks/results/camvid_round2/pretrain/ with its val curve and the commands that made it.
  Fine-tunes load it with `--pretrained-backbone` and start with fresh heads.
- Decision rule: a difference between the variants in a cell counts when its size exceeds twice
  the larger seed standard deviation, on test. Which factor explains round 1 is read from the 2x2
  table (main effects and interaction, with their spreads), not from any single cell: with D the
  (Offset Learning - per-pixel) test mIoU of a cell, each effect on D is given with its standard
  error from the seed spreads and counts when it exceeds twice that (docs/results-camvid-round2.md
  spells out the estimates).
- After each Offset-Learning run, `offseg analyze ideal-repr` (10 val images) and `offseg analyze
  offsets` (one val image) run on its best checkpoint, whose file is not kept; their summaries
  are kept beside the run's result.

Runs: two at a time with one thread each (`--jobs 2`, round 1's setting); finished runs are kept
in benchmarks/results/camvid_round2/ (result, training log, analysis) and skipped, unfinished ones
resume from their work dir while it exists. After each run docs/results-camvid-round2.md and its
plot are rewritten from everything finished so far.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "camvid_round2"
ROUND1_RESULTS = REPO / "benchmarks" / "results" / "camvid"
SEEDS = (0, 1, 2)
VARIANTS = [("per-pixel", "offseg-t-pixel"), ("offset learning", "offseg-t")]
HEAD_LR_1X = ("--set", "optimizer.custom_keys.head.lr_mult=1")
PRETRAINED_BACKBONE = RESULTS / "pretrain" / "backbone.safetensors"
# arm -> (head lr, starting point, extra `offseg train` arguments)
ARMS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "A": ("1x", "from scratch", HEAD_LR_1X),
    "B": ("10x", "pretrained stand-in", ("--pretrained-backbone", str(PRETRAINED_BACKBONE))),
    "C": ("1x", "pretrained stand-in", (*HEAD_LR_1X, "--pretrained-backbone", str(PRETRAINED_BACKBONE))),
}

# The pretraining, fixed before any run.
PRETRAIN_DATA = {"num_train": 4000, "num_val": 200, "size": (180, 240), "seed": 1}
PRETRAIN_MODEL, PRETRAIN_ITERS, PRETRAIN_SEED, PRETRAIN_VAL_INTERVAL = "offseg-t-pixel", 4000, 0, 250


def planned_runs() -> list[tuple[str, str, str, int]]:
    """(arm, variant, model, seed), seed-major so that every cell gets its first seed early."""
    return [(arm, v, m, s) for s in SEEDS for arm in ARMS for v, m in VARIANTS]


def pretrain_command(data_root: Path, work_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "offseg.cli.main",
        "train",
        "--model",
        PRETRAIN_MODEL,
        "--data",
        "folder",
        "--data-root",
        str(data_root),
        "--recipe",
        "camvid",
        "--iters",
        str(PRETRAIN_ITERS),
        "--seed",
        str(PRETRAIN_SEED),
        "--val-interval",
        str(PRETRAIN_VAL_INTERVAL),
        "--work-dir",
        str(work_dir),
        "--resume",
        "--no-progress",
    ]


def pretrain(out: Path, threads: int) -> Path:
    """Make the pretrained stand-in once; returns the kept backbone file."""
    if PRETRAINED_BACKBONE.is_file():
        return PRETRAINED_BACKBONE
    import torch
    from safetensors.torch import save_file

    from offseg.data import generate_synthetic_dataset

    data_root, work_dir = out / "synthetic", out / "pretrain"
    if (
        not (data_root / "classes.txt").is_file()
        or len(list((data_root / "train" / "images").glob("*.png"))) < PRETRAIN_DATA["num_train"]
    ):
        print(
            f"== generating {PRETRAIN_DATA['num_train']} + {PRETRAIN_DATA['num_val']} street scenes in {data_root}",
            flush=True,
        )
        generate_synthetic_dataset(data_root, **PRETRAIN_DATA)
    work_dir.mkdir(parents=True, exist_ok=True)
    cmd = pretrain_command(data_root, work_dir)
    print(f"== pretraining {PRETRAIN_MODEL} for {PRETRAIN_ITERS} iterations ({threads} thread(s))", flush=True)
    started = time.time()
    with (work_dir / "train.out").open("a") as log:
        subprocess.run(
            cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS=str(threads))
        )
    state = torch.load(work_dir / "last.pth", weights_only=True)
    if int(state["iteration"]) < PRETRAIN_ITERS:
        raise RuntimeError(f"pretraining stopped at iteration {state['iteration']} of {PRETRAIN_ITERS}")
    backbone = {
        k[len("backbone.") :]: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in state["model"].items()
        if k.startswith("backbone.")
    }
    kept = PRETRAINED_BACKBONE.parent
    kept.mkdir(parents=True, exist_ok=True)
    save_file(backbone, str(PRETRAINED_BACKBONE), metadata={"source": f"{PRETRAIN_MODEL} iteration {PRETRAIN_ITERS}"})
    log_text = (work_dir / "log.jsonl").read_text()
    records = [json.loads(line) for line in log_text.splitlines()]
    val_curve = sorted({r["iter"]: r["val"]["mIoU"] for r in records if "val" in r}.items())
    per_iter = sorted({r["iter"]: r["sec_per_iter"] for r in records if "sec_per_iter" in r}.values())
    (kept / "log.jsonl").write_text(log_text)
    (kept / "result.json").write_text(
        json.dumps(
            {
                "model": PRETRAIN_MODEL,
                "iterations": PRETRAIN_ITERS,
                "seed": PRETRAIN_SEED,
                "data": PRETRAIN_DATA,
                "val_curve": val_curve,
                "final_val_mIoU": val_curve[-1][1] if val_curve else None,
                "train_seconds_logged": per_iter[len(per_iter) // 2] * PRETRAIN_ITERS if per_iter else None,
                "seconds_this_call": time.time() - started,
                "threads": threads,
                "commands": [
                    f"offseg.data.generate_synthetic_dataset(ROOT, **{PRETRAIN_DATA})",
                    " ".join(cmd[1:]).replace(str(REPO) + "/", ""),
                    "backbone.* of last.pth, float tensors as fp16 -> backbone.safetensors",
                ],
            },
            indent=1,
        )
    )
    print(
        f"== pretrained backbone kept: {PRETRAINED_BACKBONE} ({PRETRAINED_BACKBONE.stat().st_size / 1e6:.1f} MB)",
        flush=True,
    )
    return PRETRAINED_BACKBONE


def analyse(model: str, checkpoint: Path, data_root: Path, kept: Path, threads: int) -> None:
    """The two analyses on an Offset-Learning run's best checkpoint; summaries kept in kept/analysis."""
    scratch = checkpoint.parent / "analysis"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    base = [sys.executable, "-m", "offseg.cli.main", "analyze"]
    image = data_root / "val" / "images" / "0016E5_07997.jpg"  # round 1's picture (docs/analysis.md)
    subprocess.run(
        [
            *base,
            "ideal-repr",
            "--model",
            model,
            "--checkpoint",
            str(checkpoint),
            "--data",
            "camvid",
            "--data-root",
            str(data_root),
            "--split",
            "val",
            "--images",
            "10",
            "--out",
            str(scratch / "ideal-repr"),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [
            *base,
            "offsets",
            "--model",
            model,
            "--checkpoint",
            str(checkpoint),
            "--palette",
            "camvid",
            "--out",
            str(scratch / "offsets"),
            str(image),
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    target = kept / "analysis"
    target.mkdir(parents=True, exist_ok=True)
    for source in [
        scratch / "ideal-repr" / "summary.json",
        scratch / "ideal-repr" / "similarity.png",
        scratch / "offsets" / "offsets.json",
        *sorted((scratch / "offsets").glob("*_offsets.png")),
    ]:
        if source.is_file():
            shutil.copy(source, target / (source.parent.name + "_" + source.name))


def finish_one(
    arm: str, model: str, seed: int, data_root: Path, work: Path, kept: Path, threads: int, jobs: int
) -> dict:
    from camvid_study import run_one  # benchmarks/camvid_study.py

    result = run_one(model, seed, data_root, work, kept, threads, jobs, extra=ARMS[arm][2])
    if model == "offseg-t" and not (kept / "analysis").is_dir() and (work / "best.pth").is_file():
        analyse(model, work / "best.pth", data_root, kept, threads)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--out", default=str(REPO / "runs" / "camvid_round2"), help="work dirs (data, checkpoints)")
    parser.add_argument("--runs", type=int, default=None, help="train at most N fine-tunes in this call")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at a time (each with cores/J threads)")
    parser.add_argument("--pretrain-only", action="store_true", help="make the pretrained stand-in, then stop")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    from camvid_report2 import write_report  # benchmarks/camvid_report2.py

    def report() -> None:
        write_report(RESULTS, ROUND1_RESULTS, planned_runs(), ARMS, VARIANTS, REPO / "docs")

    if args.report_only:
        report()
        return 0
    out = Path(args.out)
    todo = []
    for arm, variant, model, seed in planned_runs():
        name = f"{arm}_{model}_s{seed}"
        if (RESULTS / name / "result.json").is_file():
            print(f"== arm {arm}, {variant} ({model}), seed {seed}: done", flush=True)
        elif args.runs is None or len(todo) < args.runs:
            todo.append((arm, variant, model, seed, out / name, RESULTS / name))
    if args.pretrain_only:
        todo = []
    jobs = max(1, args.jobs if args.pretrain_only else min(args.jobs, len(todo) or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # Arm A needs no pretraining: with two jobs, one trains arm-A runs while the other pretrains.
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        pending = {}
        if not PRETRAINED_BACKBONE.is_file():
            pending[pool.submit(pretrain, out, threads)] = None
        for arm, variant, model, seed, work, kept in todo:
            if arm != "A" and not PRETRAINED_BACKBONE.is_file() and pending:
                # wait for the pretraining before the first run that needs it
                for future in as_completed(list(pending)):
                    if pending[future] is None:
                        future.result()
                        break
            print(
                f"== arm {arm}, {variant} ({model}), seed {seed}: queued ({threads} thread(s), {jobs} at a time)",
                flush=True,
            )
            pending[pool.submit(finish_one, arm, model, seed, Path(args.data_root), work, kept, threads, jobs)] = (
                arm,
                variant,
                model,
                seed,
            )
        for future in as_completed(pending):
            if pending[future] is None:
                future.result()
                continue
            arm, variant, model, seed = pending[future]
            result = future.result()
            print(
                f"== arm {arm}, {variant} ({model}), seed {seed}: test mIoU {result['test']['mIoU']:.2f}  "
                f"best val {result['best_val_mIoU']:.2f}",
                flush=True,
            )
            report()
    report()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
