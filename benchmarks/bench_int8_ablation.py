"""Which parts of the network cost accuracy, and which give speed and memory, when quantised to int8:
an ablation over op types and node groups, for one checkpoint, in one run.

    python benchmarks/bench_int8_ablation.py --checkpoint runs/camvid/best.pth --split val \\
        --variants "compute" "compute +move" "all -softmax@ol" ...

Every variant is a set of nodes that get int8 QDQ; the rest stays float. A variant is written as a
start set and changes applied left to right: `compute`, `all`, `none`, or a preset name of
`offseg.quantize.QUANT_PRESETS`, then `+GROUP[@PART]` / `-GROUP[@PART]`, where GROUP is an op-type
group (`GROUPS` below, one op type, or nothing for every type) and PART a part of the network
(`PARTS`; `gelu`: the GELU modules, float Gelu nodes since `offseg.quantize.fuse_gelu`; or a regular
expression searched in the node's module path; default: all of it).
Example: `compute +move +addmul@ff` quantises Conv / MatMul / Gemm everywhere, the data-movement
ops everywhere, and Add / Mul in the FreqFusion steps.

For the model this exports the fp32 graph at the test size (the padded size of a test image after
the test resize) and at 512x512, calibrates each once on --images training images (MinMax over
every tensor any variant can quantise, cached), writes one int8 file per variant and measures:

1. mIoU on --split at the test scale (choose on val, report on test), and the pixel agreement with
   the fp32 ONNX model;
2. latency at both sizes, batch 1: all variants and the fp32 ONNX model alternated --reps times in
   this one process (medians; ratios to fp32 ONNX are the figures that compare);
3. peak memory at 512x512: each variant loaded and run three times in a fresh process (peak
   resident memory minus resident memory before loading), as `benchmarks/bench_int8.py` does.

Run it with one thread pinned to one core on a shared machine (`taskset -c 1`, OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int8 import (  # noqa: E402
    _model_name,
    cpu_description,
    evaluate_variants,
    load_runner,
    peak_memory,
    time_variants,
)

# op-type groups (ONNX Runtime's quantisable types that occur in OffSeg graphs)
GROUPS: dict[str, tuple[str, ...]] = {
    "compute": ("Conv", "MatMul", "Gemm"),
    # data movement: exact on int8 values (output scale = input scale), no new range
    "move": ("Reshape", "Transpose", "Slice", "Unsqueeze", "Squeeze", "Pad", "Concat", "Gather", "Flatten", "Split"),
    "addmul": ("Add", "Mul"),
    "norm": ("InstanceNormalization", "LayerNormalization"),
    "softmax": ("Softmax",),
    "act": ("Sigmoid", "Clip", "Relu", "LeakyRelu", "AveragePool", "GlobalAveragePool", "MaxPool", "Where"),
    "resize": ("Resize",),
}
# parts of the network by node name (the exporter names nodes after the modules)
PARTS: dict[str, Any] = {
    "backbone": lambda name: name.startswith("/model/backbone/"),
    "ff": lambda name: "/freqfusions." in name,
    "ol": lambda name: "/offset_learning/" in name,
    "head": lambda name: (
        name.startswith("/model/decode_head/") and "/freqfusions." not in name and "/offset_learning/" not in name
    ),
    "final": lambda name: name.startswith("/model/") and name.count("/") == 2,  # the logits resize
}


def quantisable_types() -> set[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


def _ops(group: str) -> set[str]:
    if not group:  # "+@PART" / "-@PART": every quantisable op of the part
        return quantisable_types()
    if group in GROUPS:
        return set(GROUPS[group])
    if group in quantisable_types():
        return {group}
    raise SystemExit(f"unknown op group {group!r}: {', '.join(GROUPS)} or an op type ONNX Runtime quantises")


def selected_nodes(spec: str, nodes: list[tuple[str, str]], paths: dict[str, str]) -> set[str]:
    """Names of the nodes (op_type, name) that variant `spec` quantises (parts matched on `paths`)."""
    from offseg.quantize import QUANT_PRESETS

    tokens = spec.split()
    base, changes = tokens[0], tokens[1:]
    quantisable = quantisable_types()
    if base == "all":
        chosen = {name for op, name in nodes if op in quantisable}
    elif base == "none":
        chosen = set()
    elif base in GROUPS:
        chosen = {name for op, name in nodes if op in GROUPS[base]}
    elif base in QUANT_PRESETS:
        op_types, pattern = QUANT_PRESETS[base]
        types = set(op_types) if op_types is not None else quantisable
        keep = re.compile(pattern) if pattern else None
        chosen = {name for op, name in nodes if op in types and not (keep and keep.search(paths[name]))}
    else:
        raise SystemExit(f"variant {spec!r}: starts with all, none, a group or a preset, not {base!r}")
    for change in changes:
        if change[0] not in "+-":
            raise SystemExit(f"variant {spec!r}: {change!r} is not +GROUP[@PART] or -GROUP[@PART]")
        group, _, part = change[1:].partition("@")
        ops = _ops(group)
        if part == "gelu":  # the modules of the GELUs (fused Gelu, or the exporter's Div, Erf, Add, Mul, Mul)
            gelu = {paths[name].rsplit("/", 1)[0] for op, name in nodes if op in ("Erf", "Gelu")}
            in_part = lambda name, modules=gelu: name.rsplit("/", 1)[0] in modules  # noqa: E731
        else:
            in_part = PARTS.get(part) or (lambda name, pattern=re.compile(part): bool(pattern.search(name)))
        picked = {name for op, name in nodes if op in ops and (not part or in_part(paths[name]))}
        chosen = chosen | picked if change[0] == "+" else chosen - picked
    return chosen


def prepare(model: torch.nn.Module, work: Path, tag: str, size: tuple[int, int], calibration, sidecar: dict) -> dict:
    """fp32 export (with sidecar), ORT pre-processing and one MinMax calibration over every tensor."""
    import contextlib
    import io

    from onnxruntime.quantization.shape_inference import quant_pre_process

    from offseg.export import export_onnx
    from offseg.onnx_model import write_sidecar
    from offseg.quantize import _quiet_ort_logs, fuse_gelu_file

    fp32 = work / f"{tag}_fp32.onnx"
    prepared = work / f"{tag}_prepared.onnx"
    cache = work / f"{tag}_calibration.json"
    if not fp32.is_file():
        export_onnx(model, fp32, size)
        write_sidecar(fp32, precision="fp32", size=size, **sidecar)
    if not prepared.is_file():
        with contextlib.redirect_stdout(io.StringIO()), _quiet_ort_logs():
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)
        fuse_gelu_file(prepared)  # as offseg.quantize does
    if not cache.is_file():
        print(f"  calibrating {tag} on {len(calibration)} images ...", file=sys.stderr)
        quantise(prepared, work / f"{tag}_calibration_run.onnx", set(), cache, calibration, size)
    return {"fp32": fp32, "prepared": prepared, "cache": cache}


def quantise(prepared: Path, out: Path, chosen: set[str], cache: Path, calibration, size) -> None:
    import onnx
    from onnxruntime import quantization as ortq

    from offseg.quantize import _Calibration, _quiet_ort_logs

    graph = onnx.load(str(prepared), load_external_data=False).graph
    present = {n.op_type for n in graph.node} & quantisable_types()
    exclude = [n.name for n in graph.node if n.op_type in present and n.name not in chosen]
    with _quiet_ort_logs():
        ortq.quantize_static(
            str(prepared),
            str(out),
            _Calibration(calibration, size, 32) if not cache.is_file() else None,
            quant_format=ortq.QuantFormat.QDQ,
            op_types_to_quantize=sorted(present),
            per_channel=True,
            activation_type=ortq.QuantType.QUInt8,
            weight_type=ortq.QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=ortq.CalibrationMethod.MinMax,
            calibration_cache_path=str(cache),
        )


def build_variants(prep: dict, work: Path, tag: str, specs: list[str], size, sidecar: dict) -> dict[str, str]:
    import onnx

    from offseg.onnx_model import write_sidecar
    from offseg.quantize import module_paths

    graph = onnx.load(str(prep["prepared"]), load_external_data=False).graph
    nodes = [(n.op_type, n.name) for n in graph.node]
    paths = module_paths(graph)  # the module each node belongs to, as the presets match it
    files = {"fp32 onnx": str(prep["fp32"])}
    for i, spec in enumerate(specs):
        out = work / f"{tag}_v{i}.onnx"
        chosen = selected_nodes(spec, nodes, paths)
        quantise(prep["prepared"], out, chosen, prep["cache"], None, size)
        write_sidecar(
            out, precision="int8", size=size, quantization={"ablation": spec, "nodes": len(chosen)}, **sidecar
        )
        files[spec] = str(out)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an `offseg train` checkpoint (names its model)")
    parser.add_argument("--data", default="camvid")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"))
    parser.add_argument("--split", default="val", help="evaluation split (default: val: choose there)")
    parser.add_argument("--images", type=int, default=100, help="calibration images from train (default: 100)")
    parser.add_argument("--limit", type=int, help="evaluate the first N images only")
    parser.add_argument("--variants", nargs="+", default=["compute", "all"], help="variant specs (module doc)")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per variant and size")
    parser.add_argument("--sizes", nargs="+", default=["test", "512x512"], help="timing sizes: test and/or HxW")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the evaluation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work-dir", help="where ONNX files and calibration caches go (reused when present)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    import offseg
    from offseg.data import build_dataset
    from offseg.inference import default_test_mode
    from offseg.quantize import calibration_images

    name = _model_name(args.checkpoint)
    model = offseg.create_model(name, checkpoint=args.checkpoint).eval()
    scale = getattr(model, "test_scale", None)
    data = build_dataset(args.data, args.data_root, args.split, pipeline="test")
    if scale:
        data.set_test_scale(tuple(scale))
    test_mode = default_test_mode(name, args.data)
    first = torch.as_tensor(data[0]["image"])
    test_size = (first.shape[-2] + -first.shape[-2] % 32, first.shape[-1] + -first.shape[-1] % 32)
    calibration = calibration_images(args.data, args.data_root, args.images, scale)
    sidecar = dict(
        model_name=name, num_classes=model.num_classes, dataset=args.data, test_scale=scale, test_mode=test_mode
    )
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": cpu_description(),
        "threads": args.threads,
        "checkpoint": args.checkpoint,
        "model": name,
        "split": args.split,
        "variants": args.variants,
    }
    with tempfile.TemporaryDirectory(prefix="int8-ablation-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tag = f"{name}_{Path(args.checkpoint).parent.name}_{Path(args.checkpoint).stem}"
        sizes = [test_size if s == "test" else tuple(int(v) for v in s.split("x")) for s in args.sizes]
        files_by_size = {}
        for size in dict.fromkeys([test_size, *sizes]):
            calib = calibration
            if size != test_size:  # speed only: the calibration images resized to the graph size
                calib = [
                    F.interpolate(c[None], size=size, mode="bilinear", align_corners=False)[0] for c in calibration
                ]
            size_tag = f"{tag}_{size[0]}x{size[1]}"
            prep = prepare(model, work, size_tag, size, calib, sidecar)
            files_by_size[size] = build_variants(prep, work, size_tag, args.variants, size, sidecar)
        if not args.no_accuracy:
            files = files_by_size[test_size]
            runners = {k: load_runner("onnx", v, args.threads) for k, v in files.items()}
            print(f"  evaluating {len(runners)} variants on {args.split} ...", file=sys.stderr)
            results["accuracy"] = evaluate_variants(runners, data, args.limit, int(model.num_classes), test_mode)
            del runners
        results["sizes"] = {}
        for size in sizes:
            files = files_by_size[size]
            runners = {k: load_runner("onnx", v, args.threads) for k, v in files.items()}
            print(f"  timing {len(runners)} variants at {size[0]}x{size[1]} ...", file=sys.stderr)
            latency = time_variants(runners, size, args.reps)
            del runners
            entry: dict[str, Any] = {"latency_ms": {k: 1000 * v for k, v in latency.items()}}
            entry["file_mib"] = {k: Path(v).stat().st_size / 2**20 for k, v in files.items()}
            if not args.no_memory and size == sizes[-1]:
                entry["peak_mib"] = {k: peak_memory("onnx", v, size, args.threads) for k, v in files.items()}
            results["sizes"][f"{size[0]}x{size[1]}"] = entry
    text = report(results)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**results, "report": text}, indent=2) + "\n")


def report(results: dict[str, Any]) -> str:
    cpu = results["cpu"]
    sizes = list(results["sizes"])
    head = "| variant | mIoU | change | agreement |" + "".join(f" ms {s} | x fp32 {s} |" for s in sizes)
    head += " peak MiB | file MiB |"
    lines = [
        f"{results['model']} ({results['checkpoint']}), {results['split']}; CPU: {cpu['model']}, AVX-512 VNNI "
        f"{'yes' if cpu['avx512_vnni'] else 'no'}; {results['threads']} thread(s)",
        "",
        head,
        "|---|" + "---:|" * (3 + 2 * len(sizes) + 2),
    ]
    accuracy = results.get("accuracy", {})
    base = accuracy.get("fp32 onnx", {}).get("mIoU")
    last = results["sizes"][sizes[-1]]
    for variant in ["fp32 onnx", *results["variants"]]:
        acc = accuracy.get(variant)
        cells = [f"`{variant}`"]
        if acc:
            cells += [f"{acc['mIoU']:.2f}", f"{acc['mIoU'] - base:+.2f}", f"{100 * acc['agreement']:.2f}%"]
        else:
            cells += ["", "", ""]
        for s in sizes:
            lat = results["sizes"][s]["latency_ms"]
            cells += [f"{lat[variant]:.1f}", f"{lat[variant] / lat['fp32 onnx']:.2f}"]
        peak = last.get("peak_mib", {}).get(variant)
        cells += ["" if peak is None else f"{peak:.0f}", f"{last['file_mib'][variant]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
