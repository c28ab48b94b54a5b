"""int8 on the CPU: accuracy, agreement, latency and peak memory of ONNX Runtime int8 models
against the fp32 ONNX export and the fp32 PyTorch fast path, for OffSeg-T with Offset Learning
and with the per-pixel classifier, in one run.

    python benchmarks/bench_int8.py --checkpoint-ol runs/camvid_t/last.pth \\
        --checkpoint-pixel runs/camvid_t_pixel/last.pth --data-root ../shared/data/camvid [--quick]

Checkpoints: `offseg train --model offseg-t` / `offseg-t-pixel` runs (they name their model and
record their test scale). For each model this

1. exports the fp32 ONNX graph at the test size (the padded size of the first test image after
   the test resize; CamVid recipe: 180x240 -> 192x256) and quantises it with every preset of
   `offseg.quantize.QUANT_PRESETS`, calibrated on --images training images (test pipeline);
2. evaluates on the test split: mIoU of the fp32 fast path, the fp32 ONNX file and each int8 file,
   and the fraction of pixels where int8 predicts the class fp32 (fast path) predicts;
3. times one forward pass (batch 1) of fast path, fp32 ONNX and each int8 file at the test size and
   at 512x512 (graphs exported and quantised at that size, calibrated on the same images resized to
   it), alternating the variants --reps times in this one process (medians, and ratios to fp32 ONNX);
4. measures peak memory: each variant loads and runs three times in a fresh process; the figure
   is the process's peak resident memory (VmHWM) minus its resident memory before loading the model.

The CPU model and its VNNI flags (avx512_vnni, avx_vnni: int8 dot-product instructions, which
decide how much int8 gains) are read from /proc/cpuinfo. `--threads` sets the intra-op threads of
both PyTorch and ONNX Runtime (default 1). `--quick`: 20 test images, 8 calibration images, 3 reps.
Results are printed as markdown tables and written to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def cpu_description() -> dict[str, Any]:
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("unknown", "x86_64", ""):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "model": name,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
    }


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def load_runner(kind: str, source: str, threads: int) -> torch.nn.Module:
    """'fast': a PyTorch checkpoint as the fp32 fast path; 'onnx': an ONNX file with its sidecar."""
    torch.set_num_threads(threads)
    if kind == "fast":
        import offseg
        from offseg.optimize import optimize_for_inference

        return optimize_for_inference(offseg.create_model(_model_name(source), checkpoint=source).eval())
    from offseg.onnx_model import OnnxSegmentor

    return OnnxSegmentor(source, threads=threads)


def _model_name(checkpoint: str) -> str:
    from offseg.checkpoint import read_checkpoint

    name = read_checkpoint(checkpoint).metadata.get("model_name")
    if not name:
        raise SystemExit(f"{checkpoint}: does not name its model (use a checkpoint of `offseg train`)")
    return str(name)


def memory_worker(spec: str) -> None:
    """Child process: load one variant, run it three times, print its peak memory (MiB) as JSON."""
    job = json.loads(spec)
    # imported before the baseline, so they do not count
    import onnxruntime  # noqa: F401

    import offseg  # noqa: F401

    torch.set_flush_denormal(True)
    before = _rss_kib("VmRSS")
    runner = load_runner(job["kind"], job["source"], job["threads"])
    x = torch.randn(1, 3, *job["size"])
    with torch.no_grad():
        for _ in range(3):
            runner(x)
    print(json.dumps({"peak_mib": (_rss_kib("VmHWM") - before) / 1024}))


def peak_memory(kind: str, source: str, size: tuple[int, int], threads: int) -> float:
    spec = json.dumps({"kind": kind, "source": source, "size": list(size), "threads": threads})
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, __file__, "--memory-worker", spec], capture_output=True, text=True, env=env, check=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def time_variants(runners: dict[str, torch.nn.Module], size: tuple[int, int], reps: int) -> dict[str, float]:
    """Median seconds of one forward pass per variant, variants alternated within each repetition."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for runner in runners.values():  # warm-up: caches, ORT's first-run allocations
            runner(x)
        for _ in range(reps):
            for name, runner in runners.items():
                start = time.perf_counter()
                runner(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def evaluate_variants(
    runners: dict[str, torch.nn.Module], dataset: Any, limit: int | None, num_classes: int, test_mode: dict
) -> dict[str, dict[str, float]]:
    """mIoU of every variant on the dataset, and each one's pixel agreement with the first."""
    from offseg.evaluation import SegMetric
    from offseg.inference import infer

    names = list(runners)
    metrics = {name: SegMetric(num_classes, getattr(dataset, "ignore_index", 255)) for name in names}
    same = dict.fromkeys(names, 0)
    pixels = 0
    count = len(dataset) if limit is None else min(limit, len(dataset))
    with torch.no_grad():
        for i in range(count):
            item = dataset[i]
            label = torch.as_tensor(item["label"])
            label = label[0] if label.dim() == 3 else label
            image = torch.as_tensor(item["image"])
            preds = {
                name: infer(runner, image, **test_mode, out_size=tuple(label.shape)).argmax(1)[0]
                for name, runner in runners.items()
            }
            reference = preds[names[0]]
            pixels += reference.numel()
            for name, pred in preds.items():
                metrics[name].update(pred, label)
                same[name] += int((pred == reference).sum())
    return {
        name: {"mIoU": metrics[name].compute()["mIoU"], "agreement": same[name] / pixels, "images": count}
        for name in names
    }


def quantise_all(
    model: torch.nn.Module,
    work: Path,
    tag: str,
    size: tuple[int, int],
    calibration: list[torch.Tensor],
    presets: list[str],
    sidecar: dict,
) -> dict[str, str]:
    """fp32 export at `size` and one int8 file per preset; returns variant name -> ONNX path."""
    from offseg.export import export_onnx
    from offseg.onnx_model import write_sidecar
    from offseg.quantize import quantize_onnx

    fp32 = work / f"{tag}_fp32.onnx"
    export_onnx(model, fp32, size)
    write_sidecar(fp32, precision="fp32", size=size, **sidecar)
    files = {"fp32 onnx": str(fp32)}
    for preset in presets:
        path = work / f"{tag}_int8_{preset}.onnx"
        record = quantize_onnx(fp32, path, calibration, size, int(getattr(model, "size_divisor", 32)), preset)
        write_sidecar(path, precision="int8", size=size, quantization=record, **sidecar)
        files[f"int8 {preset}"] = str(path)
    return files


def bench_model(checkpoint: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import offseg
    from offseg.data import build_dataset, dataset_info
    from offseg.inference import default_test_mode
    from offseg.quantize import calibration_images

    name = _model_name(checkpoint)
    model = offseg.create_model(name, checkpoint=checkpoint).eval()
    scale = getattr(model, "test_scale", None)
    if not scale:
        try:
            scale = dataset_info(args.data).test_scale
        except (ValueError, KeyError, FileNotFoundError):  # e.g. a folder dataset: images as they are
            scale = None
    test = build_dataset(args.data, args.data_root, args.split, pipeline="test")
    if scale:
        test.set_test_scale(tuple(scale))
    test_mode = default_test_mode(name, args.data)
    if test_mode["mode"] != "whole":
        raise SystemExit(f"{args.data}: this benchmark covers whole-image test modes only")
    first = torch.as_tensor(test[0]["image"])
    divisor = int(model.size_divisor)
    test_size = (first.shape[-2] + -first.shape[-2] % divisor, first.shape[-1] + -first.shape[-1] % divisor)
    calibration = calibration_images(args.data, args.data_root, args.images, scale, split=args.calibration_split)
    sidecar = dict(
        model_name=name,
        num_classes=model.num_classes,
        size_divisor=divisor,
        dataset=args.data,
        test_scale=scale,
        test_mode=test_mode,
    )
    print(f"{name}: test scale {scale}, graph size {test_size[0]}x{test_size[1]}", file=sys.stderr)
    files = quantise_all(model, work, f"{name}_test", test_size, calibration, args.presets, sidecar)
    fast = load_runner("fast", checkpoint, args.threads)
    runners = {"fp32 fast path": fast, **{k: load_runner("onnx", v, args.threads) for k, v in files.items()}}
    accuracy = evaluate_variants(runners, test, args.limit, int(model.num_classes), test_mode)
    result: dict[str, Any] = {"model": name, "checkpoint": checkpoint, "test_scale": scale, "accuracy": accuracy}
    result["sizes"] = {}
    for size in (test_size, (512, 512)):
        if size != test_size:  # graphs for this size; calibration images resized to it (speed only)
            resized = [F.interpolate(c[None], size=size, mode="bilinear", align_corners=False)[0] for c in calibration]
            files = quantise_all(model, work, f"{name}_{size[0]}x{size[1]}", size, resized, args.presets, sidecar)
            runners = {"fp32 fast path": fast, **{k: load_runner("onnx", v, args.threads) for k, v in files.items()}}
        latency = time_variants(runners, size, args.reps)
        sources = {"fp32 fast path": ("fast", checkpoint), **{k: ("onnx", v) for k, v in files.items()}}
        memory = {k: peak_memory(kind, src, size, args.threads) for k, (kind, src) in sources.items()}
        result["sizes"][f"{size[0]}x{size[1]}"] = {
            "latency_ms": {k: 1000 * v for k, v in latency.items()},
            "peak_mib": memory,
            "file_mib": {k: Path(v).stat().st_size / 2**20 for k, v in files.items()},
        }
    return result


def report(results: dict[str, Any]) -> str:
    cpu = results["cpu"]
    lines = [
        f"CPU: {cpu['model']}; AVX-512 VNNI: {'yes' if cpu['avx512_vnni'] else 'no'}, "
        f"AVX-VNNI: {'yes' if cpu['avx_vnni'] else 'no'}; {results['threads']} thread(s); "
        f"torch {results['torch']}, onnxruntime {results['onnxruntime']}",
        "",
        "| model | variant | mIoU | mIoU change | pixel agreement with fp32 |",
        "|---|---|---:|---:|---:|",
    ]
    for model in results["models"]:
        base = model["accuracy"]["fp32 fast path"]["mIoU"]
        for variant, acc in model["accuracy"].items():
            lines.append(
                f"| {model['model']} | {variant} | {acc['mIoU']:.2f} | {acc['mIoU'] - base:+.2f} | "
                f"{100 * acc['agreement']:.2f}% |"
            )
    lines += [
        "",
        "| model | size | variant | latency ms | vs fp32 ONNX | vs fast path | peak memory MiB | file MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for model in results["models"]:
        for size, figures in model["sizes"].items():
            latency = figures["latency_ms"]
            for variant, ms in latency.items():
                file_mib = figures["file_mib"].get(variant)
                lines.append(
                    f"| {model['model']} | {size} | {variant} | {ms:.1f} | {ms / latency['fp32 onnx']:.2f} | "
                    f"{ms / latency['fp32 fast path']:.2f} | {figures['peak_mib'][variant]:.0f} | "
                    f"{'' if file_mib is None else f'{file_mib:.1f}'} |"
                )
    return "\n".join(lines)


def main() -> None:
    from offseg.quantize import QUANT_PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint-ol", help="offseg-t checkpoint (Offset Learning)")
    parser.add_argument("--checkpoint-pixel", help="offseg-t-pixel checkpoint (per-pixel classifier)")
    parser.add_argument("--data", default="camvid", help="dataset (default: camvid)")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--split", default="test", help="evaluation split (default: test)")
    parser.add_argument("--calibration-split", default="train", help="calibration split (default: train)")
    parser.add_argument("--images", type=int, default=100, help="calibration images (default: 100)")
    parser.add_argument("--limit", type=int, help="evaluate the first N images only")
    parser.add_argument("--presets", nargs="+", choices=tuple(QUANT_PRESETS), default=list(QUANT_PRESETS))
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per variant (default: 20)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    parser.add_argument("--quick", action="store_true", help="20 test images, 8 calibration images, 3 reps")
    parser.add_argument("--work-dir", help="where the ONNX files go (default: a temporary folder)")
    parser.add_argument("--json", default="benchmarks/results/int8.json", help="results file")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return
    checkpoints = [c for c in (args.checkpoint_ol, args.checkpoint_pixel) if c]
    if not checkpoints:
        parser.error("give --checkpoint-ol and / or --checkpoint-pixel")
    if args.quick:
        args.limit, args.images, args.reps = args.limit or 20, min(args.images, 8), min(args.reps, 3)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as every offseg command does
    import onnxruntime

    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": cpu_description(),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "calibration_images": args.images,
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for checkpoint in checkpoints:
            results["models"].append(bench_model(checkpoint, args, work))
    text = report(results)
    print(text)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "report": text}, indent=2) + "\n")
    print(f"\nresults written to {out}", file=sys.stderr)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
