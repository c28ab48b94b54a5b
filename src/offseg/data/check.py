"""`check_dataset`: every problem of a dataset on disk, found in one pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .datasets import DatasetError, make_dataset
from .labels import canonical_name, dataset_info


@dataclass
class CheckReport:
    """Problems (one readable line each, naming the file) and pairs checked per split."""

    problems: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _default_splits(name: str, root: Path) -> tuple[str, ...]:
    key = canonical_name(name)
    if key == "folder":
        return tuple(sorted(p.name for p in root.iterdir() if (p / "images").is_dir() or (p / "labels").is_dir()))
    return dataset_info(key).splits


def check_dataset(
    name: str, root: str | Path, split: str | None = None, progress: bool = False, **options: Any
) -> CheckReport:
    """Look at every file of a dataset and report all problems instead of stopping at the first.

    Finds: missing root or split, images without labels and labels without images, unreadable
    or corrupt images and labels, image/label size mismatches, and label values outside the
    dataset's classes (after its label mapping). Without `split`, the dataset's usual splits
    are checked and those absent are listed in ``report.skipped``; with `split`, an absent
    split is a problem. `options` are `build_dataset`'s (e.g. ``num_classes=`` for folders).
    """
    from tqdm import tqdm

    root = Path(root)
    report = CheckReport()
    if not root.is_dir():
        report.problems.append(f"{root}: dataset root not found")
        return report
    splits = (split,) if split else _default_splits(name, root)
    if not splits:
        report.problems.append(f"{root}: no split folders (ROOT/SPLIT/images and ROOT/SPLIT/labels) found")
        return report
    found_any = False
    for split_name in splits:
        try:
            dataset = make_dataset(name, root, split_name, pipeline="test", strict=False, **options)
        except FileNotFoundError as err:
            (report.problems if split else report.skipped).append(str(err))
            continue
        except DatasetError as err:
            report.problems.append(str(err))
            continue
        found_any = True
        report.problems.extend(dataset.scan_problems)
        if not len(dataset) and not dataset.scan_problems:
            report.problems.append(f"{root}: split {split_name!r} has no image/label pairs")
        indices = range(len(dataset))
        if progress:
            indices = tqdm(indices, desc=f"checking {split_name}", unit="pair", leave=False)
        for index in indices:
            report.problems.extend(dataset.check_sample(index))
        report.checked[split_name] = len(dataset)
    if not found_any and not split:
        report.problems.append(f"{root}: none of the splits {', '.join(splits)} was found")
    return report
