"""The paper's comparison rerun at CPU scale on real CamVid, from scratch, with seeds.

    python benchmarks/camvid_study.py [--data-root ../shared/data/camvid] [--out runs/camvid_study]
                                      [--results benchmarks/results/camvid] [--runs N] [--jobs J]
                                      [--report-only]

Every variant trains with the same recipe (`camvid`: half resolution, crop 160, batch 8, the
same iterations, optimiser and schedule), the same data and the same seeds; the checkpoint with
the best val mIoU is evaluated on the test split. Runs are ordered so the most telling come
first: per-pixel vs full Offset Learning (3 seeds each), then the single-branch ablations, then
SegFormer-B0 vs SegFormer-B0-OL, then seeds 3 and 4 of per-pixel vs full Offset Learning. Those two
were added to the plan after its first 18 runs, because three seeds left the main comparison's test
difference close to the line (within twice the seed spread, beyond 1.5 times it). Finished runs
are skipped and unfinished ones resumed, so the study can span sessions; `--runs N` stops after
N runs were trained in this call. After each run it rewrites docs/results-camvid.md and
docs/results-camvid.png from everything finished so far.

`--jobs J` trains J runs at a time, each with cores/J threads. On the 2-core machines here two
one-thread runs (1.65 s/iteration each) got through the study 1.6x faster than one two-thread run
(1.3 s/iteration), because small convolutions do not scale across threads; the results record
the threads and jobs, and the report shows each run's time with the setting it ran in.

A finished run is its `result.json` and `log.jsonl` under --results (committed: small, and what
the report is made of); checkpoints stay in the run's work dir under --out (not committed). An
unfinished run resumes from its work dir while that exists, else it starts again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
MAIN_EXTRA_SEEDS = (3, 4)  # per-pixel vs full Offset Learning only (see the docstring)
# (variant name in the report, registered model)
VARIANTS = [
    ("per-pixel", "offseg-t-pixel"),
    ("offset learning", "offseg-t"),
    ("class offsets only", "offseg-t-co"),
    ("feature offsets only", "offseg-t-fo"),
    ("SegFormer-B0", "segformer-b0"),
    ("SegFormer-B0 + OL", "segformer-b0-ol"),
]


def planned_runs() -> list[tuple[str, str, int]]:
    first, second = VARIANTS[:2], VARIANTS[2:4]
    runs = [(v, m, s) for s in SEEDS for v, m in first]
    runs += [(v, m, s) for v, m in second for s in SEEDS]
    runs += [(v, m, s) for s in SEEDS for v, m in VARIANTS[4:]]
    runs += [(v, m, s) for s in MAIN_EXTRA_SEEDS for v, m in first]
    return runs


def train_command(model: str, seed: int, data_root: Path, work_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "offseg.cli.main",
        "train",
        "--model",
        model,
        "--data",
        "camvid",
        "--data-root",
        str(data_root),
        "--recipe",
        "camvid",
        "--seed",
        str(seed),
        "--work-dir",
        str(work_dir),
        "--resume",
        "--no-progress",
        *extra,
    ]


def run_one(
    model: str,
    seed: int,
    data_root: Path,
    work_dir: Path,
    result_dir: Path,
    threads: int,
    jobs: int,
    extra: tuple[str, ...] = (),
) -> dict:
    """Train (or finish) one run, then test its best-on-val checkpoint; kept in result_dir.

    `extra`: further `offseg train` arguments (round 2's arms: head lr rule, pretrained backbone)."""
    result_path = result_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    work_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(model, seed, data_root, work_dir, extra)
    started = time.time()
    with (work_dir / "train.out").open("a") as out:
        subprocess.run(
            cmd, check=True, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS=str(threads))
        )
    elapsed = time.time() - started

    import torch

    torch.set_num_threads(threads)

    import offseg
    from offseg.engine.recipes import load_recipe

    recipe = load_recipe("camvid", model=model)
    from offseg.data import build_dataset
    from offseg.evaluation import evaluate
    from offseg.flops import count_flops, count_parameters

    net = offseg.create_model(model, checkpoint=work_dir / "best.pth").eval()
    test_options = recipe["data"].get("test_options") or {}
    tested = evaluate(
        net,
        build_dataset("camvid", data_root, "test", pipeline="test", **test_options),
        progress=False,
        **recipe["test"],
    )
    best = torch.load(work_dir / "best.pth", weights_only=True)
    log = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
    # by iteration, the last record winning: logs written before the trainer dropped the records of
    # re-run iterations on resume hold a few twice
    val_curve = sorted({r["iter"]: r["val"]["mIoU"] for r in log if "val" in r}.items())
    # Training time of the whole run, also across resumed sessions and pauses: the median logged
    # time per iteration times the iterations (a paused or shared interval would skew a sum).
    per_iter = sorted({r["iter"]: r["sec_per_iter"] for r in log if "sec_per_iter" in r}.values())
    train_seconds = per_iter[len(per_iter) // 2] * recipe["train"]["iters"]
    crop = tuple(recipe["data"]["options"]["crop_size"])
    result = {
        "model": model,
        "seed": seed,
        "test": {k: tested[k] for k in ("mIoU", "mAcc", "aAcc")},
        "test_iou": tested["IoU"],
        "class_names": tested.get("class_names"),
        "best_val_mIoU": max(v for _, v in val_curve),
        "best_iter": int(best["iteration"]),
        "val_curve": val_curve,
        "params": count_parameters(net),
        "gflops_at_crop": count_flops(net, crop, convention="full").gflops,
        "train_seconds_logged": train_seconds,
        "seconds_this_call": elapsed,
        "command": " ".join(cmd[1:]),
        "threads": threads,
        "jobs": jobs,
        "subnormals_flushed": True,  # the trainer flushes them since 8bda9ef
    }
    result_dir.mkdir(parents=True, exist_ok=True)
    (result_dir / "log.jsonl").write_text((work_dir / "log.jsonl").read_text())
    result_path.write_text(json.dumps(result, indent=1))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--out", default=str(REPO / "runs" / "camvid_study"), help="work dirs (checkpoints)")
    parser.add_argument(
        "--results",
        default=str(REPO / "benchmarks" / "results" / "camvid"),
        help="finished runs' result.json and log.jsonl (committed)",
    )
    parser.add_argument("--runs", type=int, default=None, help="train at most N runs in this call")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at a time (each with cores/J threads)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    from camvid_report import write_report  # benchmarks/camvid_report.py

    def report() -> None:
        write_report(Path(args.results), planned_runs(), VARIANTS, REPO / "docs")

    todo, started = [], 0
    for variant, model, seed in planned_runs():
        work, kept = Path(args.out) / f"{model}_s{seed}", Path(args.results) / f"{model}_s{seed}"
        if (kept / "result.json").is_file():
            print(f"== {variant} ({model}), seed {seed}: done", flush=True)
        elif not args.report_only and (args.runs is None or started < args.runs):
            todo.append((variant, model, seed, work, kept))
            started += 1
    jobs = max(1, min(args.jobs, len(todo) or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # Worker processes, not threads: each run's test evaluation needs its own torch thread setting.
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        pending = {}
        for variant, model, seed, work, kept in todo:
            print(f"== {variant} ({model}), seed {seed}: queued ({threads} thread(s), {jobs} at a time)", flush=True)
            pending[pool.submit(run_one, model, seed, Path(args.data_root), work, kept, threads, jobs)] = (
                variant,
                model,
                seed,
            )
        for future in as_completed(pending):
            variant, model, seed = pending[future]
            result = future.result()
            print(
                f"== {variant} ({model}), seed {seed}: test mIoU {result['test']['mIoU']:.2f}  "
                f"best val {result['best_val_mIoU']:.2f}",
                flush=True,
            )
            report()
    report()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
