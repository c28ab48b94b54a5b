"""The optimiser groups and schedule of SPEC §4, on OffSeg-T's real parameter names."""

import pytest

import offseg
from offseg.engine.optim import WarmupPolySchedule, build_optimizer, match_custom_key
from offseg.engine.recipes import load_recipe

LR, WD = 6e-5, 0.01


@pytest.fixture(scope="module")
def groups_by_name():
    recipe = load_recipe("offseg_ade20k")
    model = offseg.create_model("offseg-t")
    optimizer = build_optimizer(model, recipe["optimizer"])
    by_name = {}
    for group in optimizer.param_groups:
        for name in group["names"]:
            by_name[name] = (group["lr"], group["weight_decay"])
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    return by_name


@pytest.mark.parametrize(
    "name, lr, wd",
    [
        ("decode_head.pre.0.gn.weight", LR * 10, WD),  # GroupNorm in the head: x10, with decay
        ("decode_head.align.conv.weight", LR * 10, WD),
        ("decode_head.offset_learning.cls_repr", LR * 10, WD),
        ("decode_head.offset_learning.mask_norm.weight", LR * 10, WD),  # "head" wins over "norm"
        ("backbone.network.0.0.mlp.norm1.weight", LR, 0.0),  # backbone norms: x1, no decay
        ("backbone.network.0.0.mlp.mid_norm.bias", LR, 0.0),
        ("backbone.patch_embed.1.weight", LR, WD),  # a BatchNorm whose name lacks "norm"
        ("backbone.network.4.8.token_mixer.talking_head1.weight", LR * 10, WD),  # "head" in talking_head
        ("backbone.network.4.8.token_mixer.attention_biases_seg", LR, WD),
        ("backbone.network.0.0.mlp.fc1.weight", LR, WD),
    ],
)
def test_parameter_groups(groups_by_name, name, lr, wd):
    assert groups_by_name[name] == pytest.approx((lr, wd))


def test_key_order_is_longest_first_then_alphabetical():
    keys = {"pos_block": {}, "norm": {}, "head": {}}
    assert match_custom_key("a.pos_block.norm", keys) == "pos_block"
    assert match_custom_key("decode_head.norm", keys) == "head"  # equal length: alphabetical
    assert match_custom_key("backbone.fc", keys) is None


def test_schedule_values():
    schedule = WarmupPolySchedule.from_recipe(load_recipe("offseg_ade20k")["schedule"], 160000)
    assert schedule.lr(LR, 0) == pytest.approx(LR * 1e-6)
    assert schedule.lr(LR, 1499) == pytest.approx(LR)  # warm-up ends (MMEngine counts end - begin - 1 steps)
    assert schedule.lr(LR, 1500) == pytest.approx(LR)
    assert schedule.lr(LR, 80000) == pytest.approx(LR * (1 - 78500 / 158499))
    assert schedule.lr(LR, 159999) == 0.0
    assert schedule.lr(LR, 160000) == 0.0
    assert schedule.lr(10 * LR, 80000) == pytest.approx(10 * schedule.lr(LR, 80000))


def test_coco_stuff_schedule_ends_before_training_does():
    recipe = load_recipe("offseg_coco-stuff164k", model="offseg-t")
    assert recipe["train"]["iters"] == 160000 and recipe["schedule"]["end"] == 80000
    schedule = WarmupPolySchedule.from_recipe(recipe["schedule"], recipe["train"]["iters"])
    assert schedule.lr(LR, 100000) == 0.0
    assert load_recipe("offseg_coco-stuff164k", model="offseg-b")["train"]["iters"] == 80000
