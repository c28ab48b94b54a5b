"""The load test behind docs/serve.md: `offseg serve` under closed-loop clients on 127.0.0.1,
beside the model alone in a plain loop, in one run.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_serve.py --doc docs/serve.md
    python benchmarks/bench_serve.py --seconds 4 --rounds 1 --warmup 1     # a smoke run, prints the table

Two child processes stay up through the run:
1. the model alone: `offseg.predict` on the decoded picture in a plain loop (batch 1), and
   `--max-batch` prepared copies of it per forward (`InferenceWorker.run_batch`, the worker's own
   code without the queue); the same fast path, threads and picture as the server. The batched
   forward's own peak is its peak RSS minus the RSS just before the first batched forward with
   glibc's free pages handed back (`malloc_trim`): the memory the forward itself adds. Its RSS
   after the batch-1 warm-up (idle, as the server's is taken) is printed beside it: subtracting
   that instead leaves out whatever free memory glibc happened to keep from the warm-up (30-90 MB,
   varying between identical runs);
2. `offseg serve`, loaded by that many client threads of this process per row, each posting the
   picture's file and waiting for the answer in a closed loop, on 127.0.0.1 only; every load
   stops by itself. Server RSS: after one warm-up request (idle), and its peak at the end.
The rows run round-robin in `--rounds` slices of `--seconds / --rounds` each (a noisy machine's
drifts then hit every row alike); a server slice is counted after `--warmup` seconds of load, so
that the ramp-up and the drain are left out. Figures: images/s, latency percentiles, errors (must be 0), peak
RSS; issue 18's targets are checked at the end. Clients, server and plain loop share the CPUs
this runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "data" / "camvid" / "test" / "images" / "0001TP_008550.jpg"
if not DEFAULT_IMAGE.is_file():
    DEFAULT_IMAGE = Path("/work/shared/data/camvid/test/images/0001TP_008550.jpg")
DOC_START, DOC_END = "<!-- bench_serve:start -->", "<!-- bench_serve:end -->"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {f"p{q}": float(np.percentile(ms, q)) if len(ms) else float("nan") for q in (50, 95, 99)}


# --------------------------------------------------------------------------------------------
# 1. the model alone


def model_options(args: argparse.Namespace) -> list[str]:
    options = ["--model", args.model, "--threads", str(args.threads)]
    if args.checkpoint:
        options += ["--checkpoint", args.checkpoint]
    else:
        options += ["--num-classes", str(args.num_classes)]
    return options


def plain_loop(args: argparse.Namespace) -> None:
    """Child process: the model alone. Answers one JSON line per command line read from stdin:
    `single SECONDS` / `batched SECONDS` (call times of a plain loop), `rss` (idle and peak RSS, and
    the FLOP limit of one image's forward)."""
    import torch
    from PIL import Image

    import offseg
    from offseg._heap import release_free_heap
    from offseg.benchmark import Row, forward_macs, matmul_rate
    from offseg.data.transforms import resize_image
    from offseg.models.segmentor import num_classes_of
    from offseg.predict import fit_scale
    from offseg.serve import InferenceWorker, load_served_model

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    served = load_served_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
    image = Image.open(args.image).convert("RGB")
    worker = InferenceWorker(served.runner, **{"mode": served.mode["mode"]}, max_batch=args.max_batch)

    def single() -> None:
        offseg.predict(served.runner, image, scale=served.scale, **served.mode)

    def batched() -> None:  # what the server does per batch: decoded picture -> resize -> run_batch
        picture = np.asarray(image)
        resized = [
            resize_image(picture, fit_scale(*picture.shape[:2], served.scale)) if served.scale else picture
            for _ in range(args.max_batch)
        ]
        worker.run_batch(resized, [picture.shape[:2]] * args.max_batch)

    # FLOP limit of one image's forward: its multiply-adds at the input size the network sees (the
    # picture at the test scale, padded to the size divisor), at this machine's torch.mm rate.
    picture = np.asarray(image)
    h, w = fit_scale(*picture.shape[:2], served.scale) if served.scale else picture.shape[:2]
    divisor = int(getattr(served.runner, "size_divisor", 1) or 1)
    padded = (-(-h // divisor) * divisor, -(-w // divisor) * divisor)
    macs = forward_macs(Row(args.model, size=padded, num_classes=num_classes_of(served.runner)))
    flop_limit_ms = 1000 * macs / matmul_rate(args.threads)
    single()  # warm-up: the caches of this size and the batch-1 workspace, as the server's first request
    idle = rss_mb()
    release_free_heap()  # what is in use, without the free memory glibc kept
    in_use = rss_mb()
    batched_once = False
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "rss":
            peak = rss_mb(field="VmHWM")
            figures = {
                "idle_rss_mb": idle,
                "in_use_rss_mb": in_use,
                "peak_rss_mb": peak,
                "flop_limit_ms": flop_limit_ms,
            }
            print(json.dumps(figures), flush=True)
            continue
        step = single if command == "single" else batched
        if step is batched and not batched_once:  # first call of the size: allocator warm-up, not timed
            batched()
            batched_once = True
        times = []
        end = time.perf_counter() + float(rest[0])
        while time.perf_counter() < end or not times:
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        print(json.dumps(times), flush=True)


class PlainChild:
    """The model-alone child process, driven line by line."""

    def __init__(self, args: argparse.Namespace) -> None:
        command = [sys.executable, __file__, "--plain", *model_options(args), "--image", args.image]
        command += ["--max-batch", str(args.max_batch)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, command: str):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the model-alone child exited ({self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


# --------------------------------------------------------------------------------------------
# 2. the server under closed-loop clients


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_loop(url: str, body: bytes, clients: int, seconds: float, warmup: float) -> tuple[list[float], list[str]]:
    """`clients` threads, each posting `body` and waiting for the answer, again and again. Counted:
    the requests answered within the `seconds` that follow a `warmup` (the ramp-up, when all clients
    start at once, and the draining tail after the window are left out of the figures). Returns the
    latencies of the counted requests and every error."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    window = [0.0, 0.0]

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            start.wait()
            while time.perf_counter() < window[1]:
                sent = time.perf_counter()
                try:
                    response = http.post(f"{url}/v1/segment", content=body)
                    ok = response.status_code == 200 and "labels_png" in response.json()
                    problem = None if ok else f"HTTP {response.status_code}"
                except Exception as err:  # a failed request is counted, not fatal
                    problem = f"{type(err).__name__}: {err}"
                done = time.perf_counter()
                with lock:
                    if problem is not None:
                        errors.append(problem)
                    elif window[0] <= done <= window[1]:
                        latencies.append(done - sent)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    window[:] = [now + warmup, now + warmup + seconds]
    start.wait()
    for t in threads:
        t.join()
    return latencies, errors


class Server:
    """`offseg serve` as a child process on a free port of 127.0.0.1."""

    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "offseg.cli.main", "serve", *model_options(args)]
        command += ["--port", self.url.rsplit(":", 1)[1], "--max-batch", str(args.max_batch), "--log-level", "warning"]
        self.process = subprocess.Popen(command)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"offseg serve exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("offseg serve did not come up in 300 s")
            time.sleep(0.2)

    def batches(self) -> tuple[float, float]:
        """(forward passes, images) so far, from /metrics."""
        import httpx

        metrics = httpx.get(f"{self.url}/metrics").text
        count = float(re.search(r"^offseg_batch_size_count (\S+)$", metrics, re.M).group(1))
        total = float(re.search(r"^offseg_batch_size_sum (\S+)$", metrics, re.M).group(1))
        return count, total

    def close(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def measure(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Every row, round-robin in `--rounds` slices (plain batch 1, server at each concurrency, plain
    batched), so that a noisy machine's drifts hit all rows alike. Returns (rows, plain RSS, server RSS)."""
    import httpx

    body = Path(args.image).read_bytes()
    log("starting the model-alone child and the server")
    plain = PlainChild(args)
    server = Server(args)
    try:
        httpx.post(f"{server.url}/v1/segment", content=body, timeout=300).raise_for_status()  # warm-up
        server_idle = rss_mb(server.process.pid)
        order = ["plain 1", *(f"server {c}" for c in args.concurrency), f"plain {args.max_batch}"]
        rows = {name: {"times": [], "errors": [], "elapsed": 0.0, "forwards": 0.0, "images": 0.0} for name in order}
        share = args.seconds / args.rounds
        for round_index in range(args.rounds):
            for name in order:
                log(f"round {round_index + 1}/{args.rounds}: {name} for {share:g} s")
                row = rows[name]
                if name.startswith("plain"):
                    times = plain.ask(f"{'single' if name == 'plain 1' else 'batched'} {share}")
                    row["times"] += times
                    row["elapsed"] += sum(times)
                    row["forwards"] += len(times)
                    row["images"] += len(times) * int(name.split()[1])
                else:
                    before = server.batches()
                    latencies, errors = closed_loop(server.url, body, int(name.split()[1]), share, args.warmup)
                    after = server.batches()
                    row["times"] += latencies
                    row["errors"] += errors
                    row["elapsed"] += share
                    row["forwards"] += after[0] - before[0]
                    row["images"] += after[1] - before[1]
        server_rss = {"idle_rss_mb": server_idle, "peak_rss_mb": rss_mb(server.process.pid, "VmHWM")}
        plain_rss = plain.ask("rss")
    finally:
        server.close()
        plain.close()
    return rows, plain_rss, server_rss


# --------------------------------------------------------------------------------------------
# report


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def report(args: argparse.Namespace, rows: dict, plain_rss: dict, server_rss: dict, command: str) -> str:
    cpus = sorted(os.sched_getaffinity(0))
    weights = Path(args.checkpoint).name if args.checkpoint else f"random weights, {args.num_classes} classes"
    lines = [
        f"`{command}`",
        "",
        f"{cpu_name()}, {os.cpu_count()} logical CPUs; this run on CPU(s) {', '.join(map(str, cpus))}: server, "
        f"client threads and plain loop all share them. torch threads {args.threads}, {args.model} ({weights}), "
        f"picture {Path(args.image).name} ({args.image_size}), `--max-batch {args.max_batch}`, "
        f"{args.seconds:g} s per row in {args.rounds} round-robin slices (server slices counted after "
        f"{args.warmup:g} s of load); load average at the start {args.load_start}.",
        "",
        "| what | images/s | p50 ms | p50 x FLOP limit | p95 ms | p99 ms | errors | images per forward |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    figures = {}
    for name, row in rows.items():
        kind, number = name.split()
        images_per_s = row["images"] / row["elapsed"] if kind == "plain" else len(row["times"]) / row["elapsed"]
        figures[name] = {"images_per_s": images_per_s, **percentiles(row["times"])}
        what = {
            "plain": f"model alone, batch {number}" + (" (`offseg.predict`)" if number == "1" else " (per forward)"),
            "server": f"server, {number} client{'s' if number != '1' else ''}",
        }[kind]
        f = figures[name]
        errors = len(row["errors"]) if kind == "server" else "-"
        per_forward = row["images"] / row["forwards"] if row["forwards"] else float("nan")
        limit = plain_rss["flop_limit_ms"] * (int(number) if kind == "plain" else 1)
        lines.append(
            f"| {what} | {images_per_s:.2f} | {f['p50']:.0f} | {f['p50'] / limit:.1f} | {f['p95']:.0f} "
            f"| {f['p99']:.0f} | {errors} | {per_forward:.2f} |"
        )
    lines.append("")
    lines.append(
        "Images per forward: the server's `/metrics` over each whole slice (ramp-up and drain included). "
        "Latency: from sending a request to its whole answer, at the client. FLOP limit: the multiply-adds "
        f"of one image's forward at this machine's `torch.mm` rate on {args.threads} thread(s), "
        f"{plain_rss['flop_limit_ms']:.0f} ms (a server request's latency against one image's, a plain batched "
        "forward's against its images')."
    )
    lines.append("")
    b1, bn = figures["plain 1"], figures[f"plain {args.max_batch}"]
    checks = []
    if "server 1" in figures:
        ratio = figures["server 1"]["p50"] / b1["p50"]
        verdict = "met" if ratio <= 1.10 else "NOT met"
        checks.append(f"concurrency 1 p50 / model alone batch-1 p50 = {ratio:.3f} (target ≤ 1.10: {verdict})")
    if "server 16" in figures:
        ratio = figures["server 16"]["images_per_s"] / bn["images_per_s"]
        verdict = "met" if ratio >= 0.85 else "NOT met"
        checks.append(
            f"concurrency 16 images/s / model alone batch-{args.max_batch} images/s = {ratio:.3f} "
            f"(target ≥ 0.85: {verdict})"
        )
    forward_peak = plain_rss["peak_rss_mb"] - plain_rss["in_use_rss_mb"]
    bound = server_rss["idle_rss_mb"] + forward_peak
    verdict = "met" if server_rss["peak_rss_mb"] <= bound else "NOT met"
    checks.append(
        f"server peak RSS {server_rss['peak_rss_mb']:.0f} MB ≤ idle {server_rss['idle_rss_mb']:.0f} MB + the batched "
        f"forward's own peak {forward_peak:.0f} MB (model alone: peak {plain_rss['peak_rss_mb']:.0f}, in use before "
        f"it {plain_rss['in_use_rss_mb']:.0f}; idle after the warm-up {plain_rss['idle_rss_mb']:.0f}, which would "
        f"give {plain_rss['peak_rss_mb'] - plain_rss['idle_rss_mb']:.0f}) = {bound:.0f} MB: {verdict}"
    )
    errors = sum(len(row["errors"]) for row in rows.values())
    kinds = sorted({e for row in rows.values() for e in row["errors"]})[:3]
    checks.append(f"errors: {errors} (must be 0: {'met' if errors == 0 else 'NOT met: ' + '; '.join(kinds)})")
    lines += [f"- {c}" for c in checks]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="offseg-t")
    parser.add_argument("--checkpoint", help="weights (default: random weights, --num-classes classes)")
    parser.add_argument("--num-classes", type=int, default=11, help="without --checkpoint (default: 11, CamVid's)")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="the picture (default: a CamVid test image)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of plain loop and server (default: 1)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time per row (default: 20)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3, help="round-robin slices of each row (default: 3)")
    parser.add_argument(
        "--warmup", type=float, default=5.0, help="seconds of load before each server slice is counted (default: 5)"
    )
    parser.add_argument("--doc", help="write the table into this Markdown file, between its bench_serve markers")
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.plain:
        plain_loop(args)
        return 0
    if not Path(args.image).is_file():
        raise SystemExit(f"bench_serve: {args.image}: no such picture (give --image)")
    from PIL import Image

    with Image.open(args.image) as image:
        args.image_size = f"{image.width}x{image.height}"
    args.load_start = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    command = "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:])
    rows, plain_rss, server_rss = measure(args)
    table = report(args, rows, plain_rss, server_rss, command)
    print(table)
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text()
        if DOC_START not in text or DOC_END not in text:
            raise SystemExit(f"bench_serve: {doc} has no {DOC_START} ... {DOC_END} markers")
        before, rest = text.split(DOC_START, 1)
        doc.write_text(before + DOC_START + "\n" + table + "\n" + DOC_END + rest.split(DOC_END, 1)[1])
        log(f"table written to {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
