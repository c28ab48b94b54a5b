"""The training loop: iteration-based, one process or many (torchrun), resumable exactly.

Exact resumption rests on three facts: the data of draw n depends only on (seed, n) (see
`TrainStream`); the learning rate depends only on the iteration; and a checkpoint holds the
model, the optimiser, the iteration and every RNG state. A run killed at any point and resumed
from its last checkpoint therefore ends with the same parameters as a run never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.sampling import worker_init_fn
from .checkpointing import atomic_save, load_training_checkpoint, rng_states, set_rng_states
from .distributed import barrier, cleanup, init_distributed
from .optim import WarmupPolySchedule, build_optimizer
from .recipes import save_recipe


class TrainStream(Dataset):
    """The endless training stream: draw n -> a training sample, a function of (seed, n) only.

    Draws walk through one seeded permutation of the dataset per epoch (so every sample is seen
    once per epoch, and ranks of a multi-process run share the permutation and take disjoint
    draws, like DistributedSampler). The augmentation of a draw is seeded by (seed, epoch, index):
    offseg datasets take `dataset[(index, epoch)]`; for any other dataset the global RNGs are
    seeded per draw (and restored). Either way a sample does not depend on worker count, loading
    order, or how often the run was resumed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self._perm_epoch = -1
        self._perm: list[int] = []

    def __len__(self) -> int:  # draws are unbounded; DataLoader only needs the sampler's length
        return sys.maxsize

    def locate(self, draw: int) -> tuple[int, int]:
        """(dataset index, epoch) of a draw."""
        epoch, pos = divmod(draw, len(cast(Sized, self.dataset)))  # map-style datasets have a length
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = torch.randperm(len(cast(Sized, self.dataset)), generator=gen).tolist()
            self._perm_epoch = epoch
        return self._perm[pos], epoch

    def __getitem__(self, draw: int) -> dict[str, Any]:
        index, epoch = self.locate(draw)
        if hasattr(self.dataset, "rng_for"):
            sample = self.dataset[(index, epoch)]
        else:
            sample = self._seeded_load(index, (self.seed * 1_000_003 + draw) % (2**31))
        return {"image": sample["image"], "label": sample["label"]}

    def _seeded_load(self, index: int, seed: int) -> dict[str, Any]:
        # Put the global RNGs back afterwards: with workers=0 this runs in the training process,
        # whose dropout must not depend on data seeds.
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class DrawSampler(Sampler[int]):
    """The draw numbers of one process, from a starting iteration on.

    Iteration i, accumulation step a, process r, slot j takes draw ((i*A + a)*W + r)*B + j.
    """

    def __init__(self, start_iter: int, iters: int, batch: int, accumulate: int, world: int, rank: int) -> None:
        self.start_iter, self.iters = start_iter, iters
        self.batch, self.accumulate, self.world, self.rank = batch, accumulate, world, rank

    def __len__(self) -> int:
        return (self.iters - self.start_iter) * self.accumulate * self.batch

    def __iter__(self) -> Iterator[int]:
        for it in range(self.start_iter, self.iters):
            for step in range(self.accumulate):
                first = ((it * self.accumulate + step) * self.world + self.rank) * self.batch
                yield from range(first, first + self.batch)


class SegmentationLoss(nn.Module):
    """Model + loss in one module, so that DistributedDataParallel wraps the whole training
    forward. Models with their own `loss(images, labels)` (mask classification) use it;
    the others get MMSegmentation's cross-entropy: logits resized to the label, ignore 255,
    averaged over all pixels (ignored ones count as 0) unless `avg_non_ignore`."""

    def __init__(
        self, model: nn.Module, ignore_index: int = 255, avg_non_ignore: bool = False, tiled: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore
        # Tiled: the resize to the labels and the cross-entropy computed band by band from the
        # head's logits (offseg.models.losses.resized_cross_entropy: same loss and gradients,
        # without the full-resolution logits of every class and their gradient).
        self.tiled = tiled

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model_loss = getattr(self.model, "loss", None)
        if model_loss is not None:
            return model_loss(images, labels)
        head_logits = _head_logits(self.model) if self.tiled else None
        if head_logits is not None:
            from ..models.losses.resized_cross_entropy import resized_cross_entropy

            return resized_cross_entropy(
                head_logits(images),
                labels,
                resize_to=(int(images.shape[-2]), int(images.shape[-1])),
                ignore_index=self.ignore_index,
                avg_non_ignore=self.avg_non_ignore,
            )
        logits = self.model(images)
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # mixed precision: the loss in float32 (float64 stays float64)
        loss = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="none")
        if self.avg_non_ignore:
            return loss.sum() / (labels != self.ignore_index).sum().clamp(min=1)
        return loss.mean()


def _head_logits(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`model.forward_logits` when `model(x)` is exactly its head's logits resized bilinearly to
    the input (so the loss can take the resize on itself), else None."""
    from ..models.segmentor import Segmentor

    if isinstance(model, Segmentor) and type(model).forward is Segmentor.forward:
        return model.forward_logits
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class JsonlLog:
    """One JSON object per line, appended: the run's log and its source of truth. With
    `tensorboard`, the same figures also go to TensorBoard event files in ``tensorboard/`` beside
    it (train/loss, train/lr, val/mIoU, val/mAcc, val/aAcc and val/IoU/<class>)."""

    def __init__(
        self, path: Path, enabled: bool, tensorboard: bool = False, class_names: list[str] | None = None
    ) -> None:
        self.path, self.enabled = path, enabled
        self.tensorboard = tensorboard and enabled
        self.class_names = class_names
        self.tb: Any = None  # a SummaryWriter once asked for

    def _writer(self, purge_step: int | None = None):
        if self.tensorboard and self.tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError(
                    "--log tensorboard needs the tensorboard package: pip install 'offseg[tensorboard]'"
                ) from err
            # purge_step: on resume, TensorBoard drops what the killed run logged after the checkpoint
            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=purge_step)
        return self.tb

    def resume_at(self, iteration: int) -> None:
        """Drop what was logged after the checkpoint being resumed (those iterations run again),
        so the log reads as one run with each iteration once; then note the resumption."""
        if not self.enabled:
            return
        self._writer(purge_step=iteration + 1)
        if self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iter", 0) <= iteration
            ]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        self.write({"event": "resume", "iter": iteration})

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tb = self._writer()
        if tb is None or "iter" not in record or "event" in record:
            return
        step = int(record["iter"])
        for key in ("loss", "lr"):
            if key in record:
                tb.add_scalar(f"train/{key}", record[key], step)
        val = record.get("val") or {}
        for key in ("mIoU", "mAcc", "aAcc"):
            if key in val:
                tb.add_scalar(f"val/{key}", val[key], step)
        for index, iou in enumerate(val.get("IoU") or []):
            name = self.class_names[index] if self.class_names and index < len(self.class_names) else str(index)
            if iou is not None and math.isfinite(iou):  # NaN: the class is in neither labels nor predictions
                tb.add_scalar(f"val/IoU/{name}", iou, step)
        tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _build_data(recipe: Mapping[str, Any], split_key: str, pipeline: str):
    from ..data import build_dataset

    data = recipe["data"]
    if not data.get("root"):
        raise ValueError("no data root: pass --data-root DIR (or set data.root in the recipe)")
    options = dict(data.get("options") or {}) if pipeline == "train" else dict(data.get("test_options") or {})
    if pipeline == "train":
        options.setdefault("seed", recipe["train"]["seed"])
    return build_dataset(data["name"], data["root"], data[split_key], pipeline=pipeline, **options)


def train(
    recipe: dict[str, Any],
    work_dir: str | Path,
    resume: bool = False,
    pretrained_backbone: str | None = None,
    device: str | None = None,
    progress: bool = True,
    log_to: Sequence[str] = ("jsonl",),
) -> dict[str, Any]:
    """Run (or resume) the recipe's training in `work_dir`.

    `log_to`: "jsonl" (``log.jsonl``, always written) and optionally "tensorboard" (event files
    in ``work_dir/tensorboard``; needs the tensorboard package).

    Returns {"model": the trained network (unwrapped), "val": the last validation results
    (empty without validation), "iteration": iterations done}.
    """
    from ..factory import create_model

    work_dir = Path(work_dir)
    dist_info = init_distributed(device)
    # Subnormal floats appear in FreqFusion's sampler as a model trains and make a CPU step up to
    # 3x slower (benchmarks/bench_denormals.py); flushing them to zero only changes values below 1.2e-38.
    torch.set_flush_denormal(True)
    cfg_train = recipe["train"]
    last_path, best_path = work_dir / "last.pth", work_dir / "best.pth"

    state = None
    if resume and last_path.is_file():
        state = load_training_checkpoint(last_path)
        recipe = state["recipe"]  # the run continues with the recipe it started with
        cfg_train = recipe["train"]
    iters, accumulate = int(cfg_train["iters"]), int(cfg_train["accumulate"])
    world = dist_info.world_size
    total_batch = int(cfg_train["batch_size"])
    if total_batch % (world * accumulate):
        raise ValueError(
            f"batch size {total_batch} does not split over {world} process(es) x {accumulate} accumulation steps"
        )
    batch = total_batch // (world * accumulate)

    if dist_info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, work_dir / "recipe.yaml")
    barrier()

    train_set = _build_data(recipe, "train_split", "train")
    val_set = _build_data(recipe, "val_split", "test") if cfg_train.get("val_interval") else None
    num_classes = train_set.num_classes

    torch.manual_seed(int(cfg_train["seed"]))  # identical initial weights on every rank
    model = create_model(recipe["model"], num_classes=num_classes, **(recipe.get("model_options") or {}))
    if pretrained_backbone and state is None:
        from ..pretrained import load_backbone_weights

        report = load_backbone_weights(model, pretrained_backbone)
        if dist_info.is_main:
            print(report)
    model.to(dist_info.device)
    loss_module: nn.Module = SegmentationLoss(model, avg_non_ignore=bool(cfg_train.get("avg_non_ignore")))
    if dist_info.enabled:
        if dist_info.device.type == "cuda" and cfg_train.get("sync_bn", True):
            loss_module = nn.SyncBatchNorm.convert_sync_batchnorm(loss_module)
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module,
            device_ids=[dist_info.local_rank] if dist_info.device.type == "cuda" else None,
            find_unused_parameters=True,
        )  # Offset-Learning heads carry an unused conv_seg
    model = cast(SegmentationLoss, _unwrap(loss_module)).model

    optimizer = build_optimizer(model, recipe["optimizer"])
    schedule = WarmupPolySchedule.from_recipe(recipe["schedule"], iters)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None, False: None}[cfg_train.get("amp")]
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16 and dist_info.device.type == "cuda")

    start_iter, best_miou, last_val = 0, -1.0, {}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_iter, best_miou = int(state["iteration"]), float(state["best_miou"])
        set_rng_states(state["rng"][dist_info.rank] if isinstance(state["rng"], list) else state["rng"])
    else:
        torch.manual_seed(int(cfg_train["seed"]) + dist_info.rank)  # dropout / drop-path differ per rank

    stream = TrainStream(train_set, int(cfg_train["seed"]))
    sampler = DrawSampler(start_iter, iters, batch, accumulate, world, dist_info.rank)
    workers = int(recipe["data"].get("num_workers", 0))
    loader = DataLoader(
        stream,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        worker_init_fn=worker_init_fn if workers else None,
        drop_last=False,
        pin_memory=dist_info.device.type == "cuda",
        persistent_workers=False,
    )
    batches = iter(loader)

    class_names = getattr(train_set, "class_names", None)
    log = JsonlLog(
        work_dir / "log.jsonl",
        dist_info.is_main,
        tensorboard="tensorboard" in log_to,
        class_names=list(class_names) if class_names is not None else None,
    )
    if state is None:
        log.write(
            {
                "event": "start",
                "model": recipe["model"],
                "num_classes": num_classes,
                "iters": iters,
                "batch_size": total_batch,
                "world_size": world,
            }
        )
    else:
        log.resume_at(start_iter)
    bar = None
    if progress and dist_info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=iters, initial=start_iter, desc="train", dynamic_ncols=True)

    def save(path: Path, iteration: int) -> None:
        # every rank's RNG state, so a resumed multi-process run continues each rank exactly
        gathered: list[Any] = [rng_states()]
        if dist_info.enabled:
            import torch.distributed as dist

            gathered = [None] * world
            dist.all_gather_object(gathered, rng_states())
        if dist_info.is_main:
            atomic_save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "iteration": iteration,
                    "best_miou": best_miou,
                    "rng": gathered if world > 1 else gathered[0],
                    "recipe": recipe,
                    "model_name": recipe["model"],
                    "num_classes": num_classes,
                    "class_names": list(train_set.class_names),
                    "draws_consumed": iteration * total_batch,
                },
                path,
            )

    loss_module.train()
    window_loss, window_start = [], time.perf_counter()
    for it in range(start_iter, iters):
        schedule.apply(optimizer, it)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for _ in range(accumulate):
            sample = next(batches)
            images = sample["image"].to(dist_info.device, non_blocking=True)
            labels = sample["label"].to(dist_info.device, non_blocking=True)
            with torch.autocast(dist_info.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = loss_module(images, labels) / accumulate
            scaler.scale(loss).backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(
                f"loss became {loss_sum} at iteration {it}; lower the learning rate or check the data"
            )
        clip = recipe["optimizer"].get("clip_grad")
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
        scaler.step(optimizer)
        scaler.update()
        done = it + 1
        window_loss.append(loss_sum)

        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if done % int(cfg_train["log_interval"]) == 0 or done == iters:
            elapsed = time.perf_counter() - window_start
            log.write(
                {
                    "iter": done,
                    "loss": float(np.mean(window_loss)),
                    "lr": optimizer.param_groups[0]["lr"],
                    "sec_per_iter": elapsed / len(window_loss),
                    "eta_sec": elapsed / len(window_loss) * (iters - done),
                }
            )
            window_loss, window_start = [], time.perf_counter()

        val_interval = cfg_train.get("val_interval")
        if val_set is not None and val_interval and (done % int(val_interval) == 0 or done == iters):
            last_val = validate(model, val_set, recipe, progress=progress and dist_info.is_main)
            if dist_info.is_main:
                record = {k: last_val[k] for k in ("mIoU", "mAcc", "aAcc")}
                # per class, null where undefined (the class in neither labels nor predictions)
                record["IoU"] = [None if math.isnan(v) else v for v in last_val["IoU"]]
                log.write({"iter": done, "val": record})
                if bar is not None:
                    bar.write(
                        f"iter {done}: val mIoU {last_val['mIoU']:.2f}  mAcc {last_val['mAcc']:.2f}  aAcc "
                        f"{last_val['aAcc']:.2f}"
                    )
            if last_val["mIoU"] > best_miou:
                best_miou = last_val["mIoU"]
                save(best_path, done)
            loss_module.train()
        if done % int(cfg_train["save_interval"]) == 0 or done == iters:
            save(last_path, done)
    if bar is not None:
        bar.close()
    log.close()
    barrier()
    cleanup()
    return {"model": model, "val": last_val, "iteration": iters}


def validate(model: nn.Module, dataset: Dataset, recipe: Mapping[str, Any], progress: bool = False) -> dict[str, Any]:
    """The recipe's test mode on the validation set (optionally only its first `val_limit` images)."""
    from ..evaluation import evaluate

    limit = recipe["train"].get("val_limit")
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(int(limit), len(cast(Sized, dataset)))))
    test = dict(recipe.get("test") or {})
    return evaluate(model, dataset, progress=progress, **test)
