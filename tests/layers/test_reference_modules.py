"""The standalone building blocks reproduce the official modules' reference vectors."""

import torch

from offseg.models.layers.carafe import carafe
from offseg.models.layers.freqfusion import FreqFusion
from offseg.models.layers.offset_learning import OffsetLearning, OffsetLearningMask, official_offset_learning
from reference import TOLERANCE, assert_close, load_vector


def test_carafe_cases():
    vec = load_vector("carafe")
    for case in vec.sidecar["cases"]:
        name = case["name"]
        out = carafe(
            vec[f"{name}.input.features"],
            vec[f"{name}.input.masks"],
            case["kernel_size"],
            case["group_size"],
            case["scale_factor"],
        )
        assert_close(out, vec[f"{name}.output"], TOLERANCE["module"], name)


def test_carafe_matches_definition_with_groups():
    # Direct evaluation of the defining sum, with 2 channel groups and zero outside the map.
    torch.manual_seed(0)
    n, c, h, w, k, g, s = 1, 4, 3, 4, 3, 2, 2
    feats = torch.randn(n, c, h, w, dtype=torch.float64)
    masks = torch.randn(n, g * k * k, h * s, w * s, dtype=torch.float64)
    expected = torch.zeros(n, c, h * s, w * s, dtype=torch.float64)
    r = (k - 1) // 2
    for ch in range(c):
        grp = ch // (c // g)
        for y in range(h * s):
            for x in range(w * s):
                for i in range(k):
                    for j in range(k):
                        sy, sx = y // s + i - r, x // s + j - r
                        if 0 <= sy < h and 0 <= sx < w:
                            expected[0, ch, y, x] += masks[0, grp * k * k + i * k + j, y, x] * feats[0, ch, sy, sx]
    torch.testing.assert_close(carafe(feats, masks, k, g, s), expected)


def test_freqfusion_module():
    vec = load_vector("freqfusion_module")
    module = FreqFusion(64, 128, 48)
    assert torch.equal(
        module.dysampler.init_pos, vec.weights["dysampler.init_pos"]
    )  # constant buffer built identically
    module.load_state_dict(vec.weights, strict=True)
    module.eval()
    with torch.no_grad():
        mask_lr, hr_feat, lr_feat = module(vec["input.hr_feat"], vec["input.lr_feat"])
    assert_close(mask_lr, vec["output.mask_lr"], TOLERANCE["module"], "mask_lr")
    assert_close(hr_feat, vec["output.hr_feat"], TOLERANCE["module"], "hr_feat")
    assert_close(lr_feat, vec["output.lr_feat"], TOLERANCE["module"], "lr_feat")


def test_offset_learning_module():
    vec = load_vector("offset_learning_module")
    module = OffsetLearning(150, 256)
    module.load_state_dict(vec.weights, strict=True)
    module.eval()
    with torch.no_grad():
        assert_close(module(vec["input.x"]), vec["output.masks"], TOLERANCE["module"], "masks")


def test_regrouped_offset_learning_equals_the_official_form():
    # forward (E W'^T + softmax_K(A) [(W P_f^T) W'^T]) against forward_reference ((E + dE) W'^T):
    # values and every gradient, in float64, with weights large enough that no term is negligible.
    torch.manual_seed(0)
    module = OffsetLearning(7, 16).double()
    with torch.no_grad():
        for param in module.parameters():
            param.normal_()
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 7, 5, 6, dtype=torch.float64)
    results = []
    for forward in (module.forward, module.forward_reference):
        out = forward(x)
        results.append([out, *torch.autograd.grad(out, [x, *module.parameters()], grad_out)])
    for ours, ref in zip(*results, strict=True):
        assert (ours - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert results[0][0].is_contiguous()
    with official_offset_learning():
        assert OffsetLearning.forward is OffsetLearning.forward_reference
    assert OffsetLearning.forward is not OffsetLearning.forward_reference


def test_offset_learning_mask_module():
    vec = load_vector("offset_learning_mask_module")
    module = OffsetLearningMask(256)
    module.load_state_dict(vec.weights, strict=True)
    with torch.no_grad():
        embed, feats = module(vec["input.mask_embed"], vec["input.mask_features"])
        mask_pred = torch.einsum("bqc,bchw->bqhw", embed, feats)
    assert_close(embed, vec["output.mask_embed"], TOLERANCE["module"], "mask_embed")
    assert_close(feats, vec["output.mask_features"], TOLERANCE["module"], "mask_features")
    assert_close(mask_pred, vec["output.mask_pred"], TOLERANCE["module"], "mask_pred")


def test_single_branch_ablations_compute_what_they_say():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 4, 4)
    both = OffsetLearning(5, 16, branches="both")
    cls_only = OffsetLearning(5, 16, branches="class")
    feat_only = OffsetLearning(5, 16, branches="feature")
    assert not hasattr(cls_only, "feat_offset_proj") and not hasattr(feat_only, "cls_offset_proj")
    # Copy the shared weights; zeroing one projection of the full module equals dropping that branch.
    cls_only.load_state_dict({k: v for k, v in both.state_dict().items() if "feat_offset" not in k})
    feat_only.load_state_dict({k: v for k, v in both.state_dict().items() if "cls_offset" not in k})
    with torch.no_grad():
        saved = both.feat_offset_proj.weight.clone()
        both.feat_offset_proj.weight.zero_()
        torch.testing.assert_close(cls_only(x), both(x))
        both.feat_offset_proj.weight.copy_(saved)
        both.cls_offset_proj.weight.zero_()
        torch.testing.assert_close(feat_only(x), both(x))
