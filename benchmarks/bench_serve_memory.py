"""Where `offseg serve`'s resident memory goes: the figures of docs/serve.md's "Peak RSS" paragraph.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_serve_memory.py plain fixed main
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_serve_memory.py plain mixed thread [--trim]
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_serve_memory.py server [--seconds 25]

Allocator settings come from the environment (MALLOC_ARENA_MAX=1, MALLOC_MMAP_THRESHOLD_=...,
LD_PRELOAD=.../libjemalloc.so.2), so one variant per process.

`plain`: no server. OffSeg-T (random weights, 11 classes) on the CamVid picture of
benchmarks/bench_serve.py, through the worker's own `run_batch`: one batch-1 forward, then 12
forwards of batch 8 (`fixed`) or 24 of sizes drawn from 1-8 (`mixed`, seed 0), in the main thread
or another thread (glibc gives it an arena of its own). `--trim`: malloc_trim before a forward
whose size differs from the previous one, as the server's worker does. Printed, in MB: RSS after the
batch-1 forward (idle), RSS in use after a malloc_trim that follows it (as bench_serve.py's model
alone measures), peak RSS, and the peak above each; for `fixed`, also the median time of a
forward of 8 pictures, that time over its FLOP limit (its multiply-adds at this machine's
one-thread `torch.mm` rate, measured in the same process), and its page faults.

`server`: `offseg serve` as benchmarks/bench_serve.py starts it, one warm-up request, then 16
closed-loop clients for `--seconds`: idle RSS, peak RSS, peak above idle, images/s, errors, images
per forward.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402  (the load test's helpers: picture, server, clients, RSS)


def plain(sizes: str, where: str, trim: bool) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    import offseg
    from offseg._heap import release_free_heap
    from offseg.benchmark import Row, forward_macs, matmul_rate
    from offseg.serve import InferenceWorker, load_served_model

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    served = load_served_model("offseg-t", checkpoint=None, num_classes=11)
    image = Image.open(bench_serve.DEFAULT_IMAGE).convert("RGB")
    picture = np.asarray(image)
    worker = InferenceWorker(served.runner, mode=served.mode["mode"], max_batch=8)
    # FLOP limit of a forward of 8 pictures (padded to 384x480) at this machine's 1-thread torch.mm rate
    padded = tuple(-(-d // 32) * 32 for d in picture.shape[:2])
    flop_limit_s = forward_macs(Row("offseg-t", size=padded, batch=8, num_classes=11)) / matmul_rate(1)
    rng = random.Random(0)
    counts = [8] * 12 if sizes == "fixed" else [rng.choice([8, 8, 8, 7, 6, 5, 3, 1]) for _ in range(24)]
    report: dict = {}

    def job() -> None:
        offseg.predict(served.runner, image, scale=served.scale, **served.mode)
        idle = bench_serve.rss_mb()
        release_free_heap()  # as bench_serve.py's model alone: what is in use, without kept free memory
        in_use = bench_serve.rss_mb()
        last = None
        times, faults = [], []
        for n in counts:
            if trim and n != last:
                release_free_heap()
            last = n
            started, faulted = time.perf_counter(), resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            worker.run_batch([picture] * n, [picture.shape[:2]] * n)
            times.append(time.perf_counter() - started)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faulted)
        peak = bench_serve.rss_mb(field="VmHWM")
        report.update(
            idle_mb=round(idle),
            in_use_mb=round(in_use),
            peak_mb=round(peak),
            above_idle_mb=round(peak - idle),
            above_in_use_mb=round(peak - in_use),
        )
        if sizes == "fixed":  # per forward of 8 pictures, after the first
            median = statistics.median(times[1:])
            report.update(
                ms_per_forward=round(1000 * median),
                x_flop_limit=round(median / flop_limit_s, 1),
                faults_per_forward=round(statistics.median(faults[1:])),
            )

    if where == "main":
        job()
    else:
        thread = threading.Thread(target=job)
        thread.start()
        thread.join()
    return {"plain": sizes, "where": where, "trim": trim, **report}


def server(seconds: float) -> dict:
    import httpx

    args = argparse.Namespace(
        model="offseg-t", checkpoint=None, num_classes=11, threads=1, max_batch=8, image=str(bench_serve.DEFAULT_IMAGE)
    )
    body = Path(args.image).read_bytes()
    running = bench_serve.Server(args)
    try:
        httpx.post(f"{running.url}/v1/segment", content=body, timeout=300).raise_for_status()
        idle = bench_serve.rss_mb(running.process.pid)
        latencies, errors = bench_serve.closed_loop(running.url, body, 16, seconds, 3)
        peak = bench_serve.rss_mb(running.process.pid, "VmHWM")
        forwards, images = running.batches()
    finally:
        running.close()
    return {
        "idle_mb": round(idle),
        "peak_mb": round(peak),
        "above_idle_mb": round(peak - idle),
        "images_per_s": round(len(latencies) / seconds, 2),
        "errors": len(errors),
        "images_per_forward": round(images / forwards, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["plain", "server"])
    parser.add_argument("sizes", nargs="?", choices=["fixed", "mixed"], default="fixed")
    parser.add_argument("where", nargs="?", choices=["main", "thread"], default="main")
    parser.add_argument("--trim", action="store_true")
    parser.add_argument("--seconds", type=float, default=25.0)
    args = parser.parse_args()
    result = plain(args.sizes, args.where, args.trim) if args.what == "plain" else server(args.seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
