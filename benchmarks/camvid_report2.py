"""docs/results-camvid-round2.md and its plot, from round 2's finished runs (benchmarks/camvid_round2.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from camvid_report import _pm, _stats  # benchmarks/camvid_report.py: mean ± sample std

PLAN = """The plan, fixed before the first run (issue #20) and written into the driver
(`benchmarks/camvid_round2.py`); nothing was added after looking:

| arm | head learning rate | starting point | runs |
|---|---|---|---|
| round 1 | 10x (the paper's `head` rule) | from scratch | reused (seeds 0-2 of docs/results-camvid.md) |
| A | 1x (the `head` rule's lr_mult set to 1) | from scratch | 6 |
| B | 10x | pretrained stand-in | 6 |
| C | 1x | pretrained stand-in | 6 |

Variants `offseg-t-pixel` (per-pixel) and `offseg-t` (Offset Learning), seeds 0, 1 and 2 in every
cell. Everything else is round 1's `camvid` recipe: CamVid at half resolution, crop 160, batch 8,
1000 iterations, AdamW at base lr 6e-4 with warm-up and poly decay; the checkpoint with the best val
mIoU is reported on test. With lr_mult 1 the `head` rule still matches what it matched in round 1,
the backbone's `talking_head*` convs included (they learn at 10x in round 1 and B, at 1x in A and C).

Decision rules, stated before the runs:
- In a cell, the difference between the variants counts when its size exceeds twice the larger of
  the two seed standard deviations, on test.
- Which factor explains round 1 is read from the whole 2x2 table, not from one cell: with
  D = (Offset Learning - per-pixel) test mIoU of a cell, the head-lr effect is the mean of
  D(1x) - D(10x) over both starting points, the starting-point effect the mean of
  D(pretrained) - D(scratch) over both learning rates, and the interaction the difference of the
  two head-lr effects. Each is given with its standard error from the seed spreads
  (sqrt(s1²/n1 + s2²/n2) per cell difference, propagated); an effect counts when it exceeds twice
  its standard error.

The pretrained stand-in is not ImageNet pretraining. No ImageNet weights can be had here, so
`offseg-t-pixel` was trained once on 4000 of the project's generated street scenes (180x240,
eight classes: sky, building, road, sidewalk, tree, car, person, pole) for 4000 iterations, and its
backbone at the last iteration starts every fine-tune of arms B and C, with fresh heads. It is far
smaller and less varied than ImageNet, and it was learnt with a per-pixel head on classes that
overlap CamVid's, which may favour the per-pixel variant."""


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _diff_se(a: list[float], b: list[float]) -> float:
    """Standard error of mean(b) - mean(a) from the two seed spreads."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return math.sqrt(_stats(a)[1] ** 2 / len(a) + _stats(b)[1] ** 2 / len(b))


def write_report(results_dir: Path, round1_dir: Path, planned: list, arms: dict, variants: list, docs: Path) -> None:
    cells: dict[str, dict[str, list[dict]]] = {"round 1": {}}
    for _, model in variants:
        for seed in (0, 1, 2):
            run = _load(round1_dir / f"{model}_s{seed}" / "result.json")
            if run:
                cells["round 1"].setdefault(model, []).append(run)
    for arm, _, model, seed in planned:
        run = _load(results_dir / f"{arm}_{model}_s{seed}" / "result.json")
        cells.setdefault(arm, {})
        if run:
            cells[arm].setdefault(model, []).append(run)
    finished = sum(len(runs) for arm, by_model in cells.items() if arm != "round 1" for runs in by_model.values())
    pretrain = _load(results_dir / "pretrain" / "result.json")
    settings = {"round 1": ("10x", "from scratch"), **{a: (lr, start) for a, (lr, start, _) in arms.items()}}
    pixel, offset = variants[0][1], variants[1][1]

    lines = [
        "# When does Offset Learning pay? CamVid, round 2: head learning rate x starting point",
        "",
        "Written by `python benchmarks/camvid_round2.py` from the runs it finished; do not edit by hand. "
        "Round 1: [results-camvid.md](results-camvid.md).",
        "",
        PLAN,
        "",
        f"Finished: {finished} of the {len(planned)} planned fine-tunes"
        + (", and the pretraining." if pretrain else "; the pretraining is not finished.")
        + (
            " All are done."
            if finished == len(planned) and pretrain
            else " `python benchmarks/camvid_round2.py --jobs 2` trains the rest (two at a time) and rewrites this "
            "page."
        ),
        "",
    ]

    lines += ["## The pretrained stand-in", ""]
    if pretrain:
        curve = ", ".join(f"{it}: {v:.1f}" for it, v in pretrain["val_curve"])
        minutes = (pretrain.get("train_seconds_logged") or 0) / 60
        lines += [
            f"`{pretrain['model']}`, {pretrain['iterations']} iterations on {pretrain['data']['num_train']} generated "
            f"scenes (val: {pretrain['data']['num_val']} more), {minutes:.0f} min with {pretrain['threads']} "
            "thread(s). "
            f"Val mIoU over its 8 classes by iteration: {curve}.",
            "",
            "Made by: " + "; ".join(f"`{c.replace('-m offseg.cli.main', 'offseg')}`" for c in pretrain["commands"]),
            "",
            "Data pipeline: the pretraining ran with round 1's hand-written NumPy resize and colour conversion; "
            "the fine-tunes run after the switch to OpenCV (issue #19), whose outputs equal the old ones except "
            "for a rounding difference of at most one level in the hue/saturation step on some pixels "
            "(docs/data.md).",
            "",
        ]
    else:
        lines += ["(not finished yet)", ""]

    lines += [
        "## Test mIoU by cell",
        "",
        "| arm | head lr | start | per-pixel | Offset Learning | D = OL - per-pixel | 2 x larger std | counts? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    d_cells: dict[str, tuple[float, float]] = {}
    for arm, (lr, start) in settings.items():
        a = [r["test"]["mIoU"] for r in cells.get(arm, {}).get(pixel, [])]
        b = [r["test"]["mIoU"] for r in cells.get(arm, {}).get(offset, [])]
        if len(a) >= 2 and len(b) >= 2:
            diff, line = _stats(b)[0] - _stats(a)[0], 2 * max(_stats(a)[1], _stats(b)[1])
            d_cells[arm] = (diff, _diff_se(a, b))
            verdict = "yes" if abs(diff) > line else "no"
            dcol, lcol = f"{diff:+.2f}", f"{line:.2f}"
        else:
            dcol, lcol, verdict = "", "", "not enough seeds yet"
        fmt = lambda v: f"{_pm(v)} (n={len(v)})" if v else "—"  # noqa: E731
        lines.append(f"| {arm} | {lr} | {start} | {fmt(a)} | {fmt(b)} | {dcol} | {lcol} | {verdict} |")
    lines += [
        "",
        "Mean ± sample standard deviation over seeds; round 1's rows are its seeds 0-2 only "
        "(its seeds 3 and 4 were added after looking and are left out here).",
        "",
    ]

    lines += ["## Effects on D (the 2x2 read as a whole)", ""]
    if all(k in d_cells for k in ("round 1", "A", "B", "C")):
        d = {k: v[0] for k, v in d_cells.items()}
        se = {k: v[1] for k, v in d_cells.items()}
        all_se = math.sqrt(sum(s**2 for s in se.values()))
        effects = [
            ("head lr 1x vs 10x", ((d["A"] - d["round 1"]) + (d["C"] - d["B"])) / 2, all_se / 2),
            ("pretrained vs scratch", ((d["B"] - d["round 1"]) + (d["C"] - d["A"])) / 2, all_se / 2),
            ("interaction", (d["C"] - d["B"]) - (d["A"] - d["round 1"]), all_se),
        ]
        lines += ["| effect | estimate | standard error | counts (> 2 SE)? |", "|---|---|---|---|"]
        lines += [
            f"| {name} | {est:+.2f} | {s:.2f} | {'yes' if abs(est) > 2 * s else 'no'} |" for name, est, s in effects
        ]
        lines += [
            "",
            "The same effects on each variant's own test mIoU (does a factor help both?):",
            "",
            "| variant | 1x vs 10x | pretrained vs scratch |",
            "|---|---|---|",
        ]
        for variant, model in variants:
            m = {arm: _stats([r["test"]["mIoU"] for r in cells[arm][model]])[0] for arm in ("round 1", "A", "B", "C")}
            lines.append(
                f"| {variant} | {((m['A'] - m['round 1']) + (m['C'] - m['B'])) / 2:+.2f} | "
                f"{((m['B'] - m['round 1']) + (m['C'] - m['A'])) / 2:+.2f} |"
            )
        lines.append("")
    else:
        lines += ["(every cell needs two seeds of each variant first)", ""]
    # The conclusion is prose, written by a person from the finished tables (conclusion.md beside
    # the results), and kept here verbatim so that a later rewrite of this page keeps it.
    conclusion = results_dir / "conclusion.md"
    lines += ["## What the numbers say", ""]
    if finished < len(planned):
        lines += ["(written once all 18 runs are finished, from the tables above)", ""]
    elif conclusion.is_file():
        lines += [conclusion.read_text().strip(), ""]
    else:
        lines += [f"(all runs finished; the conclusion goes in {conclusion.name} beside the results)", ""]

    lines += ["## Per-class test IoU (the run closest to its cell's mean)", ""]
    any_run = next((r for by_model in cells.values() for runs in by_model.values() for r in runs), None)
    if any_run:
        names = any_run.get("class_names") or [str(i) for i in range(len(any_run["test_iou"]))]
        lines += ["| arm | variant | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for arm in settings:
            for variant, model in variants:
                runs = cells.get(arm, {}).get(model)
                if not runs:
                    continue
                mean = _stats([r["test"]["mIoU"] for r in runs])[0]
                typical = min(runs, key=lambda r: abs(r["test"]["mIoU"] - mean))
                vals = [
                    "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"
                    for v in typical["test_iou"]
                ]
                lines.append(f"| {arm} | {variant} (seed {typical['seed']}) | " + " | ".join(vals) + " |")
        lines.append("")

    lines += [
        "## Do the class offsets still swamp W?",
        "",
        "`offseg analyze` on the best-val Offset-Learning run of each arm (its files under "
        "`benchmarks/results/camvid_round2/<run>/analysis/`). Round 1 (seed 0, docs/analysis.md): "
        "‖dW_k‖ 11.9-17.5 against ‖W_k‖ 0.50-0.86; aligned W + dW cosine ≥ 0.99 across images.",
        "",
        "| arm | run | ‖W_k‖ (min-max) | ‖dW_k‖ (min-max) | W + dW cosine across images (min-max) | ideal W* mIoU "
        "| model mIoU (head res.) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        runs = [
            r
            for r in cells.get(arm, {}).get(offset, [])
            if (results_dir / f"{arm}_{offset}_s{r['seed']}" / "analysis").is_dir()
        ]
        if not runs:
            lines.append(f"| {arm} | (no analysed run yet) | | | | | |")
            continue
        best = max(runs, key=lambda r: r["best_val_mIoU"])
        folder = results_dir / f"{arm}_{offset}_s{best['seed']}" / "analysis"
        offsets, summary = _load(folder / "offsets_offsets.json"), _load(folder / "ideal-repr_summary.json")
        cols = ["", "", "", "", ""]
        if offsets:
            image = next(iter(offsets["images"].values()))
            w, dw = list(image["class_repr_norm"].values()), list(image["class_offset_norm"].values())
            cols[0], cols[1] = f"{min(w):.2f}-{max(w):.2f}", f"{min(dw):.2f}-{max(dw):.2f}"
        if summary:
            sims = [
                c["model_mean_similarity"] for c in summary["classes"] if c.get("model_mean_similarity") is not None
            ]
            cols[2] = f"{min(sims):.2f}-{max(sims):.2f}" if sims else ""
            cols[3], cols[4] = f"{summary['ideal_mIoU']:.1f}", f"{summary['model_mIoU']:.1f}"
        lines.append(f"| {arm} | seed {best['seed']} | " + " | ".join(cols) + " |")
    lines += [
        "",
        "![val mIoU against iteration, per arm](results-camvid-round2.png)",
        "",
        "## Every run",
        "",
        "| arm | model | seed | test mIoU | best val mIoU (iteration) | train time | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        for _, model in variants:
            for r in sorted(cells.get(arm, {}).get(model, []), key=lambda r: r["seed"]):
                extra = r["command"].split("--no-progress", 1)[-1].replace(str(docs.resolve().parent) + "/", "").strip()
                lines.append(
                    f"| {arm} | `{model}` | {r['seed']} | {r['test']['mIoU']:.2f} | {r['best_val_mIoU']:.2f} "
                    f"({r['best_iter']}) | "
                    f"{r['train_seconds_logged'] / 60:.0f} min | `{extra or '(recipe as is)'}` |"
                )
    lines.append("")
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results-camvid-round2.md").write_text("\n".join(lines))
    _plot(cells, settings, variants, docs / "results-camvid-round2.png")


def _plot(cells: dict, settings: dict, variants: list, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not any(cells.get(arm) for arm in settings if arm != "round 1"):
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 3.4), sharey=True)
    for ax, (arm, (lr, start)) in zip(axes, settings.items(), strict=True):
        for variant, model in variants:
            runs = cells.get(arm, {}).get(model) or []
            if not runs:
                continue
            iters = [i for i, _ in runs[0]["val_curve"]]
            curves = [[v for _, v in r["val_curve"]] for r in runs if len(r["val_curve"]) == len(iters)]
            mean = [sum(c[k] for c in curves) / len(curves) for k in range(len(iters))]
            ax.plot(iters, mean, marker="o", ms=3, label=f"{variant} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(
                    iters,
                    [min(c[k] for c in curves) for k in range(len(iters))],
                    [max(c[k] for c in curves) for k in range(len(iters))],
                    alpha=0.15,
                )
        ax.set_title(f"{arm}: head {lr}, {start}", fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("val mIoU (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
