"""Label converters that turn downloaded datasets into the layouts the datasets read.

- Cityscapes: ``gtFine/**/*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` next to
  them, through the official label table (34 ids -> 19 train ids, the rest 255).
- COCO-Stuff 164k: raw ``annotations/{train2017,val2017}/*.png`` stuffthingmaps (ids 0..181,
  255 unlabelled) -> ``*_labelTrainIds.png`` next to them (171 train ids, 255 ignore).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import DatasetError, read_label
from .labels import cityscapes_train_id_lookup, coco_stuff_train_id_lookup

_CITYSCAPES_TABLE, _CITYSCAPES_KNOWN = cityscapes_train_id_lookup()
_COCO_STUFF_TABLE = coco_stuff_train_id_lookup()


def cityscapes_to_train_ids(label_ids: np.ndarray, source: str | Path = "label") -> np.ndarray:
    """Cityscapes labelIds (uint8 H x W) -> trainIds; ids outside the table raise DatasetError."""
    label_ids = np.asarray(label_ids, dtype=np.uint8)
    known = _CITYSCAPES_KNOWN[label_ids]
    if not known.all():
        bad = np.unique(label_ids[~known])
        raise DatasetError(
            f"{source}: values {', '.join(map(str, bad[:10]))} are not Cityscapes labelIds (0-33); "
            f"is it already a trainIds file?"
        )
    return _CITYSCAPES_TABLE[label_ids]


def coco_stuff_to_train_ids(label_ids: np.ndarray, source: str | Path = "label") -> np.ndarray:
    """COCO-Stuff stuffthingmaps ids (uint8) -> train ids 0..170; unused ids and 255 -> 255.

    (MMSegmentation's converter leaves ids missing from its table unchanged; they do not occur
    in the released maps, and mapping them to ignore is the safe reading.)
    """
    return _COCO_STUFF_TABLE[np.asarray(label_ids, dtype=np.uint8)]


def _convert_one(paths: tuple[Path, Path], convert: Callable) -> None:
    source, target = paths
    train_ids = convert(read_label(source), source)
    Image.fromarray(train_ids).save(target)


def _run(jobs: Sequence[tuple[Path, Path]], convert: Callable, workers: int, progress: bool, desc: str) -> int:
    from tqdm import tqdm

    task = partial(_convert_one, convert=convert)
    bar = tqdm(total=len(jobs), desc=desc, unit="file", disable=not progress)
    try:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing

            with multiprocessing.Pool(workers) as pool:
                for _ in pool.imap_unordered(task, jobs, chunksize=16):
                    bar.update()
        else:
            for job in jobs:
                task(job)
                bar.update()
    finally:
        bar.close()
    return len(jobs)


def prepare_cityscapes(root: str | Path, workers: int = 0, progress: bool = True) -> int:
    """Write ``*_gtFine_labelTrainIds.png`` for every ``*_gtFine_labelIds.png`` under
    ROOT/gtFine (all splits); returns how many files were written."""
    root = Path(root)
    gt_dir = root / "gtFine"
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"{gt_dir}: Cityscapes gtFine folder not found")
    sources = sorted(gt_dir.rglob("*_gtFine_labelIds.png"))
    if not sources:
        raise FileNotFoundError(f"{gt_dir}: no *_gtFine_labelIds.png files found")
    jobs = [(s, s.with_name(s.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"))) for s in sources]
    return _run(jobs, cityscapes_to_train_ids, workers, progress, "cityscapes labelIds -> trainIds")


def prepare_coco_stuff164k(root: str | Path, workers: int = 0, progress: bool = True) -> int:
    """Write ``*_labelTrainIds.png`` next to every raw stuffthingmaps PNG under
    ROOT/annotations/{train2017,val2017}; returns how many files were written."""
    root = Path(root)
    ann_dir = root / "annotations"
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"{ann_dir}: COCO-Stuff annotations folder not found")
    sources = []
    for split in ("train2017", "val2017"):
        if (ann_dir / split).is_dir():
            sources += sorted(p for p in (ann_dir / split).glob("*.png") if not p.name.endswith("_labelTrainIds.png"))
    if not sources:
        raise FileNotFoundError(f"{ann_dir}: no raw stuffthingmaps PNGs in train2017/ or val2017/")
    jobs = [(s, s.with_name(s.stem + "_labelTrainIds.png")) for s in sources]
    return _run(jobs, coco_stuff_to_train_ids, workers, progress, "coco-stuff ids -> trainIds")
