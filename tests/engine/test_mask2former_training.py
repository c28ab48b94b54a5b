"""Mask2Former training: the packaged recipe's optimiser groups and schedule (the official
config's paramwise rules on the full-size model), the model's own loss in the trainer, and a few
iterations on the reduced configuration that lower the loss; the trained checkpoint then loads,
evaluates and predicts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import offseg
from offseg.data import build_dataset, generate_synthetic_dataset
from offseg.engine.optim import WarmupPolySchedule, build_optimizer, build_param_groups
from offseg.engine.recipes import default_recipe_name, load_recipe, set_iterations
from offseg.engine.trainer import SegmentationLoss, train
from offseg.models.mask2former import MASK2FORMER_REDUCED

# YAML-safe (lists, not tuples): the trainer writes the recipe to recipe.yaml.
REDUCED_OPTIONS = {k: list(v) if isinstance(v, tuple) else v for k, v in MASK2FORMER_REDUCED.items()}
SHORT_EDGES = [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024]


@pytest.fixture
def one_thread():
    # Runs after the suite's autouse 2-thread fixture: the tiny models here gain nothing from a
    # second thread, and on a shared machine it costs several times the run time.
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def recipe() -> dict:
    return load_recipe("mask2former_ade20k")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("syn"), num_train=4, num_val=2, size=(64, 96))


def test_recipe_is_the_official_config(recipe: dict) -> None:
    assert default_recipe_name("mask2former-swin-t-ol", "ade20k") == "mask2former_ade20k"
    assert default_recipe_name("mask2former-swin-t", "ade20k") == "mask2former_ade20k"
    assert recipe["model"] == "mask2former-swin-t-ol"
    opt = recipe["optimizer"]
    assert (opt["type"], opt["lr"], opt["weight_decay"], opt["eps"], list(opt["betas"])) == (
        "AdamW",
        1e-4,
        0.05,
        1e-8,
        [0.9, 0.999],
    )
    assert opt["clip_grad"] == 0.01 and opt["norm_decay_mult"] == 0.0
    # the config's keys exactly, and none of the default recipe keys (head x10, norm, pos_block)
    depths = [2, 2, 6, 2]
    expected = {
        "backbone": (0.1, 1.0),
        "backbone.patch_embed.norm": (0.1, 0.0),
        "backbone.norm": (0.1, 0.0),
        "absolute_pos_embed": (0.1, 0.0),
        "relative_position_bias_table": (0.1, 0.0),
        "query_embed": (1.0, 0.0),
        "query_feat": (1.0, 0.0),
        "level_embed": (1.0, 0.0),
    }
    expected.update(
        {f"backbone.stages.{s}.blocks.{b}.norm": (0.1, 0.0) for s, n in enumerate(depths) for b in range(n)}
    )
    expected.update({f"backbone.stages.{s}.downsample.norm": (0.1, 0.0) for s in range(len(depths) - 1)})
    assert {k: (v["lr_mult"], v["decay_mult"]) for k, v in opt["custom_keys"].items()} == expected
    assert recipe["schedule"]["warmup_iters"] == 0 and recipe["schedule"]["power"] == 0.9
    assert recipe["schedule"]["end"] == 160000 and recipe["schedule"]["eta_min"] == 0.0
    assert recipe["train"]["iters"] == 160000 and recipe["train"]["batch_size"] == 16
    assert recipe["test"] == {"mode": "whole"}
    options = recipe["data"]["options"]
    assert options["short_edges"] == SHORT_EDGES == [int(512 * x * 0.1) for x in range(5, 21)]
    assert options["max_size"] == 2048 and options["crop_size"] == [512, 512] and options["cat_max_ratio"] == 0.75
    assert "scale" not in options  # testing keeps ADE20K's (2048, 512) keep-ratio resize


def test_full_size_parameter_groups(recipe: dict) -> None:
    model = offseg.create_model("mask2former-swin-t-ol", num_classes=150)
    opt = recipe["optimizer"]
    groups = build_param_groups(model, opt["lr"], opt["weight_decay"], opt["custom_keys"], opt["norm_decay_mult"])
    mults = {name: (g["lr_mult"], g["decay_mult"]) for g in groups for name in g["names"]}
    assert len(mults) == sum(1 for _ in model.parameters())
    spot_checks = {
        "backbone.stages.0.blocks.0.norm1.weight": (0.1, 0.0),
        "backbone.stages.2.blocks.5.norm2.bias": (0.1, 0.0),
        "backbone.stages.0.blocks.0.attn.w_msa.qkv.weight": (0.1, 1.0),
        "backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table": (0.1, 0.0),
        "backbone.stages.3.blocks.1.ffn.layers.1.weight": (0.1, 1.0),
        "backbone.patch_embed.projection.weight": (0.1, 1.0),
        "backbone.patch_embed.norm.weight": (0.1, 0.0),
        "backbone.stages.2.downsample.norm.weight": (0.1, 0.0),
        "backbone.stages.2.downsample.reduction.weight": (0.1, 1.0),
        "backbone.norm3.weight": (0.1, 0.0),
        "decode_head.query_embed.weight": (1.0, 0.0),
        "decode_head.query_feat.weight": (1.0, 0.0),
        "decode_head.level_embed.weight": (1.0, 0.0),
        # MMDet's pixel decoder names its level embedding `level_encoding`: no key matches it
        "decode_head.pixel_decoder.level_encoding.weight": (1.0, 1.0),
        "decode_head.transformer_decoder.layers.0.norms.0.weight": (1.0, 0.0),  # LayerNorm: norm_decay_mult
        "decode_head.transformer_decoder.post_norm.bias": (1.0, 0.0),
        "decode_head.pixel_decoder.input_convs.0.gn.weight": (1.0, 0.0),  # GroupNorm: norm_decay_mult
        "decode_head.pixel_decoder.encoder.layers.0.norms.1.weight": (1.0, 0.0),
        "decode_head.transformer_decoder.layers.0.ffn.layers.1.weight": (1.0, 1.0),  # Linear
        "decode_head.pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.weight": (1.0, 1.0),
        "decode_head.cls_embed.weight": (1.0, 1.0),
        "decode_head.offset_learning.cls_offset_proj.weight": (1.0, 1.0),
    }
    assert {name: mults[name] for name in spot_checks} == spot_checks
    # Completely: the backbone learns at x0.1, the head at x1; no decay exactly on the norm layers,
    # the relative position tables and the three query / level embeddings.
    norm_types = (nn.LayerNorm, nn.GroupNorm)
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}"
            no_decay = (
                isinstance(module, norm_types)
                or param_name == "relative_position_bias_table"
                or any(key in name for key in ("query_embed", "query_feat", "level_embed"))
            )
            lr_mult = 0.1 if name.startswith("backbone.") else 1.0
            assert mults[name] == (lr_mult, 0.0 if no_decay else 1.0), name

    optimizer = build_optimizer(model, opt)
    assert isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(1e-4 * group["lr_mult"])
        assert group["weight_decay"] == pytest.approx(0.05 * group["decay_mult"])
        assert group["eps"] == 1e-8 and group["betas"] == (0.9, 0.999)


def test_poly_schedule_without_warmup(recipe: dict) -> None:
    schedule = WarmupPolySchedule.from_recipe(recipe["schedule"], recipe["train"]["iters"])
    assert schedule.lr(1e-4, 0) == pytest.approx(1e-4)
    assert schedule.lr(1e-4, 80000) == pytest.approx(1e-4 * (1 - 80000 / 159999) ** 0.9)
    assert schedule.lr(1e-4, 159999) == 0.0


def _tiny_recipe(root, iters: int) -> dict:
    recipe = load_recipe(
        "mask2former_ade20k",
        overrides=[f"data.root={root}", "data.name=folder", "data.train_split=train", "data.val_split=val"],
    )
    recipe["data"]["options"].update(crop_size=[64, 64], short_edges=[48, 64, 80])
    recipe["data"]["num_workers"] = 0
    recipe["model_options"] = dict(REDUCED_OPTIONS)
    recipe["train"].update(batch_size=2, log_interval=1, val_interval=0, save_interval=1000)
    return set_iterations(recipe, iters)


def test_trainer_uses_the_mask2former_loss(tiny_data, one_thread) -> None:
    model = offseg.create_model("mask2former-swin-t-ol", num_classes=8, **REDUCED_OPTIONS)
    assert set(model.state_dict()) == {k for k in model.state_dict() if k.startswith(("backbone.", "decode_head."))}
    dataset = build_dataset("folder", tiny_data, "train", crop_size=(64, 64), short_edges=[48, 64, 80])
    images = torch.stack([dataset[(i, 0)]["image"] for i in range(2)])
    labels = torch.stack([dataset[(i, 0)]["label"] for i in range(2)])
    model.eval()  # no drop path: both calls see the same network
    torch.manual_seed(0)
    via_trainer = SegmentationLoss(model)(images, labels)
    torch.manual_seed(0)
    outputs = model.forward_train_outputs(images)
    expected = sum(model.criterion(*outputs, labels).values())
    assert torch.allclose(via_trainer, expected)
    assert len(model.criterion(*outputs, labels)) == 3 * (MASK2FORMER_REDUCED["decoder_layers"] + 1)


def test_recipe_optimiser_lowers_the_loss_on_a_fixed_batch(tiny_data, one_thread) -> None:
    recipe = _tiny_recipe(tiny_data, iters=10)
    dataset = build_dataset("folder", tiny_data, "train", **recipe["data"]["options"])
    images = torch.stack([dataset[(i, 0)]["image"] for i in range(2)])
    labels = torch.stack([dataset[(i, 0)]["label"] for i in range(2)])
    torch.manual_seed(0)
    model = offseg.create_model("mask2former-swin-t-ol", num_classes=8, **REDUCED_OPTIONS)
    optimizer = build_optimizer(model, recipe["optimizer"])
    schedule = WarmupPolySchedule.from_recipe(recipe["schedule"], recipe["train"]["iters"])

    def eval_loss() -> float:
        model.eval()
        torch.manual_seed(123)  # same matching / sampling points each time
        with torch.no_grad():
            value = model.loss(images, labels).item()
        model.train()
        return value

    before = eval_loss()
    for it in range(recipe["train"]["iters"]):
        schedule.apply(optimizer, it)
        optimizer.zero_grad()
        model.loss(images, labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["optimizer"]["clip_grad"])
        optimizer.step()
    after = eval_loss()
    assert after < 0.9 * before, (before, after)


def test_train_runs_the_recipe_and_the_result_evaluates_and_predicts(tmp_path, tiny_data, one_thread) -> None:
    recipe = _tiny_recipe(tiny_data, iters=12)
    result = train(recipe, tmp_path / "run", progress=False, device="cpu")
    assert result["iteration"] == 12
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert losses[0] > 10  # the set-prediction loss (summed over 4 predictions), not a cross-entropy
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses

    # The checkpoint loads into the same reduced architecture; evaluate and predict run on it.
    model = offseg.create_model("mask2former-swin-t-ol", checkpoint=tmp_path / "run" / "last.pth", **REDUCED_OPTIONS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, result["model"].state_dict()[key]), key
    from offseg.evaluation import evaluate
    from offseg.predict import predict

    val = build_dataset("folder", tiny_data, "val", pipeline="test")
    metrics = evaluate(model, val, mode="whole", progress=False)
    assert 0.0 <= metrics["aAcc"] <= 100.0 and np.isfinite(metrics["mIoU"])
    label = predict(model, val.samples[0][0])
    assert label.shape == (64, 96) and label.min() >= 0 and label.max() < 8
