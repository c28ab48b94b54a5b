"""The benchmark engine behind `offseg bench` and `benchmarks/bench_speed.py`: latency, throughput
and peak memory of models and execution paths, side by side, measured so that rows compare.

Rows are (model, variant, forward or training step). Variants:

- ``reference``: the model computing as the official implementation does
  (`offseg.optimize.reference_computation`: FreqFusion's similarity by a dilated unfold and
  F.cosine_similarity, its kernel normaliser with permutes and copies and its two identity
  resizes, EfficientFormerV2 attention biases gathered and bicubically resized on every call,
  talking heads as 1x1 convs, BN -> GELU -> conv storing every intermediate, nothing folded), with
  CARAFE — a fused compiled kernel in the official code — computed by the library's tap loop;
- ``eager``: the model as it is, in plain PyTorch eager mode;
- ``fast``: `offseg.optimize_for_inference(model, size)` (inference only);
- ``labels``: the labels-only prediction path of `offseg.predict` (`offseg.inference.whole_labels`
  on the fast model): class ids at the input size, never the full-resolution logits;
- ``onnxruntime``: the fast model exported with `offseg.export` and run by ONNX Runtime;
- ``compile``: the fast model under `torch.compile` (inductor; needs a C++ compiler);
- ``onnx``: an ONNX file with its sidecar, as `offseg eval --onnx` runs it (`offseg.onnx_model.
  OnnxSegmentor`): an fp32 export or an int8 model of `offseg quantize`, with its trained weights
  (`onnx_rows`). Its output is compared with the first ``onnx`` row of the same model only.

A forward row computes what the official whole-image predict returns: the head's logits resized
bilinearly to the input size (the ``labels`` row: their argmax).

How it measures:

- Timing happens in one process: every row is built, warmed up, then timed round-robin (row A,
  row B, ..., row A, row B, ...), so slow phases of a shared machine hit every row alike.
  Reported: the median, the spread (fastest to slowest run), images per second at the median,
  and the median over the FLOP limit (the row's multiply-adds, `full` convention of
  `offseg.flops`, divided by the `torch.mm` 2048x2048 multiply-add rate measured in the same run).
- Memory cannot be measured that way (peak RSS only ever rises within a process), so each row is
  run again in a child process of its own: reported is that process's peak RSS minus its RSS
  right after `import torch` (so: model, buffers and the computation). By default the child runs
  with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=131072), so that freed tensors go
  back to the system and the peak tracks the memory the computation holds rather than allocator
  retention.
- Every row's output (logits, or for a training step the loss and all parameter gradients of its
  first step) is compared with the first row of the same model and mode:
  max|out - ref| / max(1, max|ref|). A ``labels`` row reports instead the share of pixels whose
  label differs from the argmax of the first row's logits where their top-two margin exceeds 1e-3.
- Weights are random but "realistic" (the perturbation of the official reference data: BN/GN/LN
  statistics and affines, layer scales, attention biases and every weight moved off their
  initial values), identical for every row of a model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._heap import release_free_heap

__all__ = [
    "LABEL_MARGIN",
    "Result",
    "Row",
    "VARIANTS",
    "build_model",
    "build_runner",
    "default_rows",
    "flop_limit_ms",
    "format_table",
    "matmul_rate",
    "measure_memory",
    "realistic_weights",
    "relative_error",
    "results_to_json",
    "run_suite",
    "time_rows",
]

VARIANTS = ("reference", "eager", "fast", "labels", "onnxruntime", "compile", "onnx")
TRAIN_VARIANTS = ("reference", "eager")
# A labels row must agree with the argmax of the logits wherever the top two classes differ by more.
LABEL_MARGIN = 1e-3


@dataclass(frozen=True)
class Row:
    """One benchmark row."""

    model: str
    variant: str = "eager"
    train: bool = False
    size: tuple[int, int] = (512, 512)
    batch: int = 1
    num_classes: int = 150
    onnx: str | None = None  # variant "onnx": the file (with its sidecar)

    @property
    def label(self) -> str:
        mode = "train step" if self.train else "forward"
        variant = f"{Path(self.onnx).name}" if self.onnx is not None else self.variant
        return f"{self.model} {variant} {mode}"

    @property
    def images(self) -> int:
        return self.batch


@dataclass
class Result:
    row: Row
    times_ms: list[float] = field(default_factory=list)
    peak_rss_mb: float | None = None  # peak RSS of the row's child process above its RSS after `import torch`
    build_rss_mb: float | None = None  # RSS above `import torch` once the row is built
    rel_error: float | None = None
    rel_error_eager: float | None = None  # against the eager row of the same model and mode, if any
    flop_limit_ms: float | None = None
    note: str = ""
    # CPU seconds of the timed runs: in the kernel (page faults of fresh memory, mostly) and in all
    cpu_kernel_s: float = 0.0
    cpu_total_s: float = 0.0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")


# --------------------------------------------------------------------------------------------
# Models with realistic weights
# --------------------------------------------------------------------------------------------


def realistic_weights(model: Any, seed: int = 0) -> Any:
    """Move every weight off its initial value, as the official reference data does, so that BN
    folding, layer scales and attention biases are exercised with non-trivial values."""
    import torch
    import torch.nn as nn

    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype) * std

    with torch.no_grad():
        handled: set[int] = set()
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(module, "weight", None) is not None:
                    module.weight.copy_(1 + normal(module.weight, 0.1))
                    module.bias.copy_(normal(module.bias, 0.1))
                    handled.update({id(module.weight), id(module.bias)})
                if (
                    isinstance(module, nn.modules.batchnorm._BatchNorm)
                    and module.running_mean is not None
                    and module.running_var is not None
                ):
                    module.running_mean.copy_(normal(module.running_mean, 0.1))
                    module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
        for name, p in model.named_parameters():
            if id(p) in handled:
                continue
            last = name.rsplit(".", 1)[-1]
            if last == "attention_biases_seg":
                p.add_(normal(p, 1.0))
            elif last.startswith("layer_scale"):
                p.add_(normal(p, 0.2))
            elif last == "cls_repr":
                p.add_(normal(p, 0.3))
            else:
                p.add_(normal(p, 0.02))
    return model


def build_model(row: Row, seed: int = 0):
    """The row's model with realistic weights (the same for every row of that model)."""
    import torch

    from .factory import create_model

    torch.manual_seed(seed)
    model = create_model(row.model, num_classes=row.num_classes)
    set_generator = getattr(getattr(model, "decode_head", None), "set_generator", None)
    if set_generator is not None:
        set_generator(seed)  # SegNeXt's NMF: the same random bases at every forward, in every row
    return realistic_weights(model, seed)


def example_inputs(row: Row, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(row.batch, 3, *row.size, generator=gen)
    labels = torch.randint(0, row.num_classes, (row.batch, *row.size), generator=gen)
    return x, labels


# --------------------------------------------------------------------------------------------
# Runners: one callable per row
# --------------------------------------------------------------------------------------------


class Runner:
    """`run()` does one timed unit of work; `check()` returns the tensor compared across rows."""

    def __init__(self, run: Callable[[], Any], check: Callable[[], Any]) -> None:
        self.run = run
        self.check = check


def _inference_runner(row: Row, workdir: Path, onnx_spin: bool, for_timing: bool = True) -> Runner:
    import torch

    from .optimize import reference_computation

    x, _ = example_inputs(row)
    if row.variant == "onnx":
        from .onnx_model import OnnxSegmentor

        onnx_model = OnnxSegmentor(_onnx_file(row), threads=torch.get_num_threads())

        def onnx_forward():
            return onnx_model(x)

        return Runner(onnx_forward, onnx_forward)
    if row.variant == "onnxruntime" and not for_timing and onnx_path(row, workdir).is_file():
        # Memory child: the export exists already, so no PyTorch model is built next to the session.
        session = _onnx_session(None, row, workdir, onnx_spin)
        feed = {session.get_inputs()[0].name: x.numpy()}
        return Runner(lambda: session.run(None, feed)[0], lambda: None)
    if row.variant in ("reference", "eager"):
        model = build_model(row).eval()
        context = reference_computation if row.variant == "reference" else contextlib.nullcontext

        def forward():
            with torch.inference_mode(), context():
                return model(x)

        return Runner(forward, forward)
    fast = _fast_model(row)
    if row.variant == "fast":
        return Runner(lambda: fast(x), lambda: fast(x))
    if row.variant == "labels":
        from .inference import whole_labels

        def labels():
            with torch.inference_mode():
                return whole_labels(fast, x)

        return Runner(labels, labels)
    if row.variant == "compile":
        compiled = torch.compile(fast.model)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def compiled_forward():
            with torch.inference_mode():
                return compiled(x_cl)

        return Runner(compiled_forward, compiled_forward)
    if row.variant == "onnxruntime":
        session = _onnx_session(fast, row, workdir, onnx_spin)
        feed = {session.get_inputs()[0].name: x.numpy()}

        def ort_forward():
            return session.run(None, feed)[0]

        return Runner(ort_forward, lambda: torch.from_numpy(ort_forward()))
    raise ValueError(f"unknown variant {row.variant!r}; choose from {', '.join(VARIANTS)}")


def _onnx_file(row: Row) -> str:
    if row.onnx is None:
        raise ValueError(f"{row.label}: an onnx row needs its file (see onnx_rows)")
    return row.onnx


def onnx_rows(paths: Sequence[str | os.PathLike], size: tuple[int, int] | None = None, batch: int = 1) -> list[Row]:
    """One ``onnx`` row per file, described by its sidecar (model name, classes, size policy).

    A fixed-size file runs at its own size (batch 1, as its graph); `size` is for dynamic files
    (default 512x512), and a `size` that differs from a fixed file's is refused.
    """
    from .onnx_model import read_sidecar

    rows = []
    for path in paths:
        config = read_sidecar(path)
        fixed = config["input"].get("size")
        if fixed:
            fixed_size = (int(fixed[0]), int(fixed[1]))
            if size is not None and tuple(size) != fixed_size:
                raise ValueError(
                    f"{path}: a fixed-size graph ({fixed_size[0]}x{fixed_size[1]}); it runs at that size, not "
                    f"--size {size[0]} {size[1]} (leave --size out, or export with --dynamic)"
                )
            if batch != 1:
                raise ValueError(f"{path}: a fixed-size graph runs batch 1, not --batch {batch}")
            row_size = fixed_size
        else:
            row_size = (int(size[0]), int(size[1])) if size is not None else (512, 512)
        name = str(config["model_name"])
        rows.append(Row(name, "onnx", False, row_size, batch, int(config["num_classes"]), onnx=str(path)))
    return rows


def _fast_model(row: Row):
    """The fast model of the row, its original released before anything runs (as `offseg predict`
    does); its size-dependent caches fill on the first (warm-up) call."""
    from .optimize import optimize_for_inference

    return optimize_for_inference(build_model(row).eval())


def onnx_path(row: Row, workdir: Path) -> Path:
    from . import __version__

    key = json.dumps([row.model, row.size, row.batch, row.num_classes, __version__])
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return workdir / f"{row.model}-{row.size[0]}x{row.size[1]}-b{row.batch}-{digest}.onnx"


def export_for_bench(row: Row, workdir: Path, fast_model: Any | None = None) -> Path:
    """Export the fast model of `row` to ONNX (once per workdir); returns the file."""
    from .export import export_onnx

    path = onnx_path(row, workdir)
    if not path.is_file():
        if fast_model is None:
            fast_model = _fast_model(row)
        # Export the rewritten network itself (BNs folded, merged projections); tracing ignores
        # memory formats, ONNX Runtime chooses its own layouts.
        export_onnx(fast_model.model, path, row.size, dynamic=row.batch != 1, check=False)
    return path


def _onnx_session(fast_model: Any, row: Row, workdir: Path, spin: bool):
    import onnxruntime as ort
    import torch

    path = export_for_bench(row, workdir, fast_model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _train_runner(row: Row) -> Runner:
    import torch

    from .engine.trainer import SegmentationLoss
    from .optimize import reference_computation

    if row.variant not in TRAIN_VARIANTS:
        raise ValueError(f"a training step runs with variant {' or '.join(TRAIN_VARIANTS)}, not {row.variant!r}")
    reference = row.variant == "reference"
    context = reference_computation if reference else contextlib.nullcontext
    model = build_model(row).train()

    def make_loss(m):
        # The reference resizes the logits to the labels and takes the cross-entropy in one piece.
        return SegmentationLoss(m, tiled=not reference)

    loss_module = make_loss(model)
    x, labels = example_inputs(row)

    def loss_and_grads():
        # First step from the initial weights, same RNG stream (dropout, drop path) for every row.
        probe = copy.deepcopy(model).train()
        torch.manual_seed(123)
        with context():
            loss = make_loss(probe)(x, labels)
            loss.backward()
        grads = [p.grad.reshape(-1) for p in probe.parameters() if p.grad is not None]
        return torch.cat([loss.detach().reshape(1), *grads])

    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with context():
            loss = loss_module(x, labels)
            loss.backward()
        optimizer.step()
        return loss.detach()

    return Runner(step, loss_and_grads)


def build_runner(row: Row, workdir: Path, onnx_spin: bool = True, for_timing: bool = True) -> Runner:
    if row.variant not in VARIANTS:
        raise ValueError(f"unknown variant {row.variant!r}; choose from {', '.join(VARIANTS)}")
    return _train_runner(row) if row.train else _inference_runner(row, workdir, onnx_spin, for_timing)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    value = _status_mb("VmRSS")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no current RSS outside Linux: the peak so far
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _peak_rss_mb() -> float:
    """Peak RSS of this process. Linux: VmHWM, which starts afresh at exec; getrusage's ru_maxrss
    would carry over the peak of the forking parent."""
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def relative_error(out: Any, ref: Any) -> float:
    """max|out - ref| / max(1, max|ref|); inf when the shapes differ."""
    import torch

    out, ref = torch.as_tensor(out).float(), torch.as_tensor(ref).float()
    if out.shape != ref.shape:
        return float("inf")
    return float((out - ref).abs().max() / max(1.0, float(ref.abs().max())))


def label_mismatch(labels: Any, logits: Any, margin: float = LABEL_MARGIN) -> float:
    """Share of pixels whose label differs from the argmax of `logits` (B, K, H, W) among those
    where the top two logits differ by more than `margin` (1.0 when the shapes differ)."""
    import torch

    labels, logits = torch.as_tensor(labels), torch.as_tensor(logits).float()
    if labels.shape != (logits.shape[0], *logits.shape[2:]):
        return 1.0
    top2 = logits.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > margin
    wrong = (labels != logits.argmax(dim=1)) & decided
    return float(wrong.sum()) / max(1, int(decided.sum()))


def _compare(row: Row, output: Any, reference: Any) -> float:
    if row.variant == "labels":
        return label_mismatch(output, reference)
    return relative_error(output, reference)


def time_rows(
    rows: Sequence[Row],
    threads: int,
    warmup: int,
    runs: int,
    workdir: Path,
    onnx_spin: bool = True,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Build every row in this process, check outputs against the first row of the same model and
    mode, warm up, then time the rows round-robin."""
    import torch

    torch.set_num_threads(threads)
    results, runners = [], []
    references: dict[Any, Any] = {}
    eager_outputs: dict[Any, Any] = {}
    for row in rows:
        log(f"  building {row.label} ...")
        runner = build_runner(row, workdir, onnx_spin)
        result = Result(row)
        output = runner.check()
        # ONNX files hold trained weights, the other rows random ones: each compares within its kind
        key = (row.model, row.train, row.size, row.batch, row.variant == "onnx")
        if key in references:
            result.rel_error = _compare(row, output, references[key])
        elif row.variant != "labels":
            references[key] = output
        if key in eager_outputs:
            result.rel_error_eager = _compare(row, output, eager_outputs[key])
        elif row.variant == "eager":
            eager_outputs[key] = output
        del output
        for _ in range(warmup):
            runner.run()
        runners.append(runner)
        results.append(result)
    log(f"  timing {len(rows)} rows x {runs} runs, round-robin ...")
    for _ in range(runs):
        for runner, result in zip(runners, results, strict=True):
            before = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            runner.run()
            result.times_ms.append(1e3 * (time.perf_counter() - start))
            after = resource.getrusage(resource.RUSAGE_SELF)
            result.cpu_kernel_s += after.ru_stime - before.ru_stime
            result.cpu_total_s += after.ru_stime - before.ru_stime + after.ru_utime - before.ru_utime
    return results


def measure_memory(
    row: Row, threads: int, runs: int, workdir: Path, malloc: str = "fixed", timeout: float = 3600
) -> dict:
    """Peak RSS of `row` in a fresh child process, above its RSS after `import torch` (module docs)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    payload = json.dumps({"row": asdict(row), "threads": threads, "runs": runs, "workdir": str(workdir)})
    proc = subprocess.run(
        [sys.executable, "-m", "offseg.benchmark", "--memory-worker", payload],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker for {row.label} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _memory_worker(payload: str) -> int:
    spec = json.loads(payload)
    row_fields = spec["row"]
    row_fields["size"] = tuple(row_fields["size"])
    row = Row(**row_fields)
    import torch

    base = _rss_mb()  # right after `import torch`: the zero of the measurement
    torch.set_num_threads(spec["threads"])
    runner = build_runner(row, Path(spec["workdir"]), for_timing=False)
    release_free_heap()  # the original of an optimised copy, freed while building: the same for every row
    build = _rss_mb()
    for _ in range(spec["runs"]):
        out = runner.run()
        del out
    print(json.dumps({"peak_rss_mb": _peak_rss_mb() - base, "build_rss_mb": build - base, "torch_rss_mb": base}))
    return 0


def matmul_rate(threads: int, n: int = 2048, runs: int = 5) -> float:
    """This machine's float32 matrix-product rate in multiply-adds per second (torch.mm, n x n)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return n**3 / statistics.median(times)


_MACS_CACHE: dict[tuple, float] = {}


def forward_macs(row: Row) -> float:
    """Multiply-adds of one forward of the row (`full` convention of `offseg.flops`, which counts
    one multiply-add as one FLOP), batch included. OffSeg-T at 512x512 with 150 classes: 9.75 G."""
    from .factory import create_model
    from .flops import count_flops

    key = (row.model, row.size, row.batch, row.num_classes)
    if key not in _MACS_CACHE:
        model = create_model(row.model, num_classes=row.num_classes)
        _MACS_CACHE[key] = float(count_flops(model, row.size, row.batch, convention="full").total)
    return _MACS_CACHE[key]


def flop_limit_ms(row: Row, macs_per_s: float) -> float | None:
    """The row's FLOP limit: its forward multiply-adds at the measured matrix-product rate (forwards only)."""
    if row.train:
        return None
    return 1e3 * forward_macs(row) / macs_per_s


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table; ratios are against the first row."""
    first = results[0]
    head = (
        "| row | batch | size | median ms | spread ms (min-max) | images/s | time x first | x FLOP limit "
        "| kernel share of CPU time | peak MB above torch | memory x first | max rel. error vs first of its model |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        row = r.row
        ratio_t = r.median_ms / first.median_ms if first.times_ms else float("nan")
        mem = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "-"
        ratio_m = f"{r.peak_rss_mb / first.peak_rss_mb:.2f}" if r.peak_rss_mb is not None and first.peak_rss_mb else "-"
        if r.rel_error is None:
            err = "-"
        elif row.variant == "labels":
            err = f"{r.rel_error:.1e} of labels"
        else:
            err = f"{r.rel_error:.1e}"
        spread = f"{min(r.times_ms):.0f}-{max(r.times_ms):.0f}" if r.times_ms else "-"
        ips = row.images / (r.median_ms / 1e3) if r.times_ms else float("nan")
        limit = f"{r.median_ms / r.flop_limit_ms:.1f}" if r.flop_limit_ms and r.times_ms else "-"
        kernel = f"{100 * r.cpu_kernel_s / r.cpu_total_s:.0f} %" if r.cpu_total_s > 0 else "-"
        lines.append(
            f"| {row.label}{' (' + r.note + ')' if r.note else ''} | {row.batch} | {row.size[0]}x{row.size[1]} "
            f"| {r.median_ms:.0f} | {spread} | {ips:.2f} | {ratio_t:.2f} | {limit} | {kernel} | {mem} | {ratio_m} "
            f"| {err} |"
        )
    return "\n".join(lines)


def run_suite(
    rows: Sequence[Row],
    threads: int,
    warmup: int,
    runs: int,
    memory: bool,
    memory_runs: int,
    workdir: Path,
    malloc: str = "fixed",
    onnx_spin: bool = True,
    log: Callable[[str], None] = print,
    macs_per_s: float | None = None,
) -> list[Result]:
    """Time `rows` round-robin in this process, then (if `memory`) measure each in a child process.
    The FLOP limit of every forward row uses `macs_per_s` (measured now when not given)."""
    results = time_rows(rows, threads, warmup, runs, workdir, onnx_spin, log)
    rate = macs_per_s if macs_per_s is not None else matmul_rate(threads)
    for result in results:
        result.flop_limit_ms = flop_limit_ms(result.row, rate)
    if memory:
        for result in results:
            log(f"  peak memory of {result.row.label} (child process) ...")
            info = measure_memory(result.row, threads, memory_runs, workdir, malloc)
            result.peak_rss_mb, result.build_rss_mb = info["peak_rss_mb"], info["build_rss_mb"]
    return results


def default_rows(
    models: Sequence[str], backends: Sequence[str], train: bool, size: tuple[int, int], batch: int, num_classes: int
) -> list[Row]:
    """Per model: reference, eager (and fast + the extra `backends` for forwards)."""
    rows = []
    for model in models:
        if train:
            variants = ["reference", "eager"]
        else:
            variants = ["reference", "eager", "fast"] + [b for b in backends if b not in ("eager",)]
        seen = []
        for variant in variants:
            if variant not in seen:
                seen.append(variant)
                rows.append(Row(model, variant, train, size, batch, num_classes))
    return rows


def results_to_json(results: Sequence[Result]) -> list[dict]:
    return [
        {
            **asdict(r.row),
            "label": r.row.label,
            "median_ms": r.median_ms,
            "times_ms": r.times_ms,
            "cpu_kernel_s": r.cpu_kernel_s,
            "cpu_total_s": r.cpu_total_s,
            "flop_limit_ms": r.flop_limit_ms,
            "peak_rss_mb": r.peak_rss_mb,
            "build_rss_mb": r.build_rss_mb,
            "rel_error": r.rel_error,
            "rel_error_eager": r.rel_error_eager,
        }
        for r in results
    ]


if __name__ == "__main__":  # the peak-memory child process
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        sys.exit(_memory_worker(sys.argv[2]))
    sys.exit("usage: this module is run as a child process by offseg.benchmark.measure_memory")
