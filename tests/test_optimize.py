"""The fast paths compute the reference function: the inference rewrites (`optimize_for_inference`)
give the same logits, and the training-path kernels (CARAFE, local similarity, fused BN -> GELU ->
conv, talking heads) give the same outputs and gradients as the official computation
(`reference_computation`)."""

import copy

import pytest
import torch
import torch.nn as nn

import offseg
from offseg.benchmark import Result, Row, build_model, example_inputs, format_table, realistic_weights, relative_error
from offseg.models.backbones import efficientformer_v2 as effv2
from offseg.models.layers import freqfusion
from offseg.models.layers.carafe import carafe, carafe_reference, carafe_taps
from offseg.models.layers.offset_learning import OffsetLearning
from offseg.optimize import fold_batch_norms, optimize_for_inference, reference_computation


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


# --------------------------------------------------------------------------------------------
# Kernels against their reference formulations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,c,h,w,k,g,s", [(2, 3, 4, 3, 5, 1, 2), (1, 4, 4, 3, 3, 2, 1), (2, 4, 3, 4, 3, 2, 2), (1, 4, 3, 3, 5, 4, 2)]
)
def test_carafe_forward_backward_equal_reference(n, c, h, w, k, g, s):
    torch.manual_seed(0)
    feats = torch.randn(n, c, h, w, dtype=torch.float64, requires_grad=True)
    masks = torch.randn(n, g * k * k, h * s, w * s, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: carafe(a, b, k, g, s), (feats, masks))
    grad_out = torch.randn(n, c, h * s, w * s, dtype=torch.float64)
    ours = torch.autograd.grad(carafe(feats, masks, k, g, s), (feats, masks), grad_out)
    ref = torch.autograd.grad(carafe_reference(feats, masks, k, g, s), (feats, masks), grad_out)
    for a, b in zip(ours, ref, strict=True):
        assert rel(a, b) < 1e-12
    with torch.no_grad():
        assert rel(carafe(feats, masks, k, g, s), carafe_reference(feats, masks, k, g, s)) < 1e-12


def test_carafe_tap_loop_banding_is_bit_identical():
    from offseg.models.layers import carafe as carafe_module

    torch.manual_seed(0)
    for k, s in ((5, 2), (3, 1)):
        feats = torch.randn(2, 8, 7, 5)
        masks = torch.randn(2, k * k, 7 * s, 5 * s).softmax(1)
        whole = carafe_taps(feats, masks, k, 1, s)
        padded = carafe_module._padded_channels_last(feats, k, 1)
        for band_elements in (1, 3 * 8 * 5 * s * s):  # one row per band; a ragged last band
            banded = carafe_module._as_nchw(carafe_module._tap_loop(padded, masks, k, s, band_elements))
            assert torch.equal(banded, whole)
        if s == 1:
            assert torch.equal(carafe(feats, masks, k, 1, s), whole)  # no upsampling: the tap loop


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("band_elements", [1, 3 * 6 * 4 * 4, None])  # a row per band, ragged bands, one band
def test_carafe_upsampling_by_products_equals_reference(monkeypatch, gather, band_elements):
    # Both forms of the products (gathered neighbourhoods; overlapping windows of the padded rows,
    # whose positions wrap across rows), several images and bands, against the textbook unfold.
    from offseg.models.layers import carafe as carafe_module

    monkeypatch.setattr(carafe_module, "GATHER_BELOW_CHANNELS", 1000 if gather else 0)
    torch.manual_seed(0)
    for k in (5, 3):
        feats = torch.randn(2, 6, 7, 4, dtype=torch.float64)
        masks = torch.randn(2, k * k, 14, 8, dtype=torch.float64)
        ours = carafe(feats, masks, k, 1, 2, band_elements=band_elements)
        assert rel(ours, carafe_reference(feats, masks, k, 1, 2)) < 1e-12
        assert rel(ours, carafe_taps(feats, masks, k, 1, 2)) < 1e-12


def test_fast_resampler_equals_grid_sample():
    # The fast path's resampler gathers the four neighbours of each sample from the channels-last
    # map; it must reproduce grid_sample (bilinear, border), clamped samples and several images too.
    from offseg.optimize import _FastFreqFusion

    torch.manual_seed(0)
    module = freqfusion.FreqFusion(16, 16, 16).eval()
    module.__class__ = _FastFreqFusion
    upsampled = torch.randn(2, 16, 10, 12).contiguous(memory_format=torch.channels_last)
    offset = 3 * torch.randn(2, 2 * 4 * 4, 5, 6)  # up to several pixels: many samples clamped
    expected = module.dysampler.sample(upsampled, offset)
    groups = upsampled.clone().permute(0, 2, 3, 1).view(2, 10, 12, 4, 4)
    module.resample_in_place(groups, offset)
    assert rel(groups.view(2, 10, 12, 16).permute(0, 3, 1, 2), expected) < 1e-6
    # the groups apart, as one side of an interleaved map
    interleaved = torch.zeros(2, 10, 12, 4, 7)
    interleaved[..., 3:] = upsampled.permute(0, 2, 3, 1).view(2, 10, 12, 4, 4)
    module.resample_in_place(interleaved[..., 3:], offset)
    assert rel(interleaved[..., 3:].reshape(2, 10, 12, 16).permute(0, 3, 1, 2), expected) < 1e-6
    assert not interleaved[..., :3].any()


def test_fast_freqfusion_fuses_into_the_interleaved_map():
    # The fast OffSeg head's fusion writes CARAFE's output and the resampled samples into their
    # side of the interleaved map; the result must be the eager fusion's outputs interleaved.
    from offseg.models.heads.offseg_head import interleave_groups
    from offseg.optimize import _FastFreqFusion

    torch.manual_seed(0)
    module = realistic_weights(freqfusion.FreqFusion(24, 40, 16).eval())
    hr, lr = torch.randn(2, 24, 12, 10), torch.randn(2, 40, 6, 5)
    with torch.inference_mode():
        _, hr_out, lr_out = module(hr, lr)
        expected = interleave_groups(hr_out, lr_out)
        module.__class__ = _FastFreqFusion
        plain = module(hr, lr)[2]
        fused = module.fuse_interleaved(hr, lr)
    assert rel(plain, lr_out) < 1e-6
    assert fused.shape == expected.shape and rel(fused, expected) < 1e-6


def test_carafe_upsample_into_refuses_what_it_cannot_do():
    from offseg.models.layers.carafe import carafe_upsample_into

    feats, masks = torch.randn(1, 8, 4, 5), torch.randn(1, 25, 8, 10).softmax(1)
    with torch.no_grad():
        out = torch.empty(1, 8, 10, 2, 4)
        assert (
            rel(
                carafe_upsample_into(feats, masks, 5, 2, out).reshape(1, 8, 10, 8).permute(0, 3, 1, 2),
                carafe_reference(feats, masks, 5, 1, 2),
            )
            < 1e-6
        )
        with pytest.raises(ValueError, match="does not fit"):
            carafe_upsample_into(feats, masks, 5, 2, torch.empty(1, 8, 9, 2, 4))
    with pytest.raises(RuntimeError, match="no gradient"):
        carafe_upsample_into(feats.requires_grad_(), masks, 5, 2, torch.empty(1, 8, 10, 2, 4))


def test_carafe_mask_gradient_bands():
    # The mask gradient of an upsampling CARAFE is computed a band of rows at a time; several bands.
    from offseg.models.layers import carafe as carafe_module

    torch.manual_seed(0)
    feats = torch.randn(2, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    masks = torch.randn(2, 25, 14, 10, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 6, 14, 10, dtype=torch.float64)
    ref = torch.autograd.grad(carafe_reference(feats, masks, 5, 1, 2), masks, grad_out)[0]
    padded = carafe_module._padded_channels_last(feats.detach(), 5, 1)
    grad = grad_out.permute(0, 2, 3, 1).reshape(2, 7, 2, 5, 2, 1, 6)
    out = torch.empty_like(masks)
    carafe_module._mask_grad_by_rows(grad, padded, out, 5, target_elements=1)  # one row per band
    assert rel(out, ref) < 1e-12


def test_local_similarity_and_normaliser_equal_reference():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    ours = freqfusion.local_cosine_similarity(x)
    ref = freqfusion.local_cosine_similarity_reference(x)
    assert rel(ours, ref) < 1e-12
    g1 = torch.autograd.grad(ours, x, grad_out)[0]
    g2 = torch.autograd.grad(ref, x, grad_out)[0]
    assert rel(g1, g2) < 1e-12
    raw = torch.randn(2, 25, 6, 5, dtype=torch.float64)
    assert (
        rel(
            freqfusion.normalize_kernels(raw, 5, torch.ones(1)),
            freqfusion.normalize_kernels_reference(raw, 5, torch.ones(1)),
        )
        < 1e-12
    )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("conv_spec", [None, (1, 1, 1), (3, 4, 2)])  # (kernel, groups, stride)
def test_fused_batch_norm_gelu_conv(training, conv_spec):
    torch.manual_seed(0)
    bn_a = nn.BatchNorm2d(8).double()
    with torch.no_grad():
        bn_a.weight.normal_(), bn_a.bias.normal_(), bn_a.running_mean.normal_(), bn_a.running_var.uniform_(0.5, 1.5)
    bn_b = copy.deepcopy(bn_a)
    conv_a = (
        None
        if conv_spec is None
        else nn.Conv2d(8, 12, conv_spec[0], conv_spec[2], conv_spec[0] // 2, groups=conv_spec[1]).double()
    )
    conv_b = copy.deepcopy(conv_a)
    bn_a.train(training), bn_b.train(training)
    x_a = torch.randn(3, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    x_b = x_a.detach().clone().requires_grad_()
    for _ in range(2):  # running statistics updated identically
        y_a = effv2.batch_norm_gelu_reference(bn_a, nn.GELU(), x_a, conv_a)
        y_b = effv2.batch_norm_gelu(bn_b, nn.GELU(), x_b, conv_b)
    grad = torch.randn_like(y_a)
    y_a.backward(grad), y_b.backward(grad)
    assert rel(y_b, y_a) < 1e-12 and rel(x_b.grad, x_a.grad) < 1e-12
    params_a = list(bn_a.parameters()) + ([] if conv_a is None else list(conv_a.parameters()))
    params_b = list(bn_b.parameters()) + ([] if conv_b is None else list(conv_b.parameters()))
    for a, b in zip(params_a, params_b, strict=True):
        assert rel(b.grad, a.grad) < 1e-12
    assert torch.equal(bn_a.running_mean, bn_b.running_mean) and torch.equal(bn_a.running_var, bn_b.running_var)
    assert int(bn_a.num_batches_tracked) == int(bn_b.num_batches_tracked)


# --------------------------------------------------------------------------------------------
# Training: the library's default computation against the official one, whole model
# --------------------------------------------------------------------------------------------


def _loss_and_grads(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, tiled: bool = True) -> torch.Tensor:
    from offseg.engine.trainer import SegmentationLoss

    torch.manual_seed(7)
    loss = SegmentationLoss(model, tiled=tiled)(x, labels)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return torch.cat([loss.detach().reshape(1)] + [g.reshape(-1) for g in grads if g is not None])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_offseg_training_gradients_equal_reference(dtype):
    model = build_model(Row("offseg-t", size=(64, 64), num_classes=7)).to(dtype).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=gen, dtype=dtype)
    labels = torch.randint(0, 7, (2, 64, 64), generator=gen)
    ref_model = copy.deepcopy(model)
    labels[:, :4, :9] = 255  # some ignored pixels
    with reference_computation():  # and the cross-entropy on logits resized in one piece
        ref = _loss_and_grads(ref_model, x, labels, tiled=False)
    ours = _loss_and_grads(model, x, labels)  # the library's training path: the tiled loss
    assert rel(ours, ref) < (1e-10 if dtype == torch.float64 else 1e-5)
    # The same BatchNorm running statistics afterwards.
    for (name, a), b in zip(model.named_buffers(), ref_model.buffers(), strict=True):
        if a.is_floating_point():
            assert rel(a, b) < 1e-5, name


def test_reference_computation_restores_the_default():
    originals = (
        freqfusion.carafe,
        freqfusion.local_cosine_similarity,
        effv2.Attention4D.forward,
        effv2.batch_norm_gelu,
        OffsetLearning.forward,
    )
    with reference_computation():
        # CARAFE stays the library's tap loop (the official op is a fused kernel, not an unfold).
        assert freqfusion.carafe is carafe_taps
        assert freqfusion.local_cosine_similarity is freqfusion.local_cosine_similarity_reference
        assert effv2.batch_norm_gelu is effv2.batch_norm_gelu_reference
        assert OffsetLearning.forward is OffsetLearning.forward_reference
    assert (
        freqfusion.carafe,
        freqfusion.local_cosine_similarity,
        effv2.Attention4D.forward,
        effv2.batch_norm_gelu,
        OffsetLearning.forward,
    ) == originals


# --------------------------------------------------------------------------------------------
# Inference: optimize_for_inference
# --------------------------------------------------------------------------------------------


# Fast path against the eager model: max relative error (issue #17). SegNeXt's MSCAN amplifies round-off.
FAST_PATH_BAR = {"segnext-t-ol": 5e-5}


@pytest.mark.parametrize(
    "name", ["offseg-t", "offseg-t-pixel", "offseg-t-co", "segformer-b0", "segformer-b0-ol", "segnext-t-ol"]
)
def test_optimized_model_gives_the_same_logits(name):
    model = build_model(Row(name, num_classes=11)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model, size=(96, 128))
    bar = FAST_PATH_BAR.get(name, 1e-5)
    for size in [(96, 128), (64, 64)]:  # the prepared size and another (caches filled on first use)
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = model(x)
            with reference_computation():
                official = model(x)
        out = fast(x)
        assert out.shape == ref.shape
        assert rel(out, ref) <= bar and rel(out, official) <= bar
        assert rel(fast.forward_logits(x), model.forward_logits(x).detach()) <= bar
    # The training model is untouched and still trains.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in fast.parameters())


@pytest.mark.slow  # about a minute: six models at 512x512, eager and fast
@pytest.mark.parametrize(
    "name", ["offseg-t", "offseg-b", "offseg-l", "segformer-b0", "segformer-b0-ol", "segnext-t-ol"]
)
def test_fast_path_exact_at_512(name):
    # The sizes, classes and weights of the benchmark (issue #17: 1e-5, SegNeXt 5e-5).
    row = Row(name)
    model = build_model(row).eval()
    x, _ = example_inputs(row)
    with torch.inference_mode():
        ref = model(x)
    assert rel(optimize_for_inference(model, row.size)(x), ref) <= FAST_PATH_BAR.get(name, 1e-5)


@pytest.mark.slow  # needs a trained checkpoint, which no test can make in seconds
def test_fast_path_on_a_trained_offseg_t():
    # Issue #17 asks for 1e-5 against the eager model. On a CamVid-trained OffSeg-T no float32
    # computation meets that: the trained head amplifies round-off (FreqFusion's kernel softmaxes
    # over logits of 100 and more, the resampler's offsets), so that on the pictures below (camvid
    # recipe, seed 0, 1000 iterations) the eager model is 6e-5 to 2.9e-4 from float64, the float64
    # model with only its module outputs rounded to float32 is 6e-5 to 3.0e-4 from eager, and eager
    # on two threads 3e-5 to 1e-4 from eager on one (benchmarks/bisect_fast_path_error.py). What
    # the fast path is held to is the eager model's own exactness, on one and on two threads:
    # summed over the pictures, its RMS distance from float64 at most 1.5x the eager model's and
    # its max relative distance at most 2x. Measured on checkpoints after 200, 800 and 1000
    # iterations: RMS 0.99-1.19x, max 0.98-1.42x (channels-last convolutions are a little less
    # exact). After 200 iterations the earlier channels-last GroupNorm gave RMS 1.63x and max 2.7x
    # on one thread, the earlier pooling product of Offset Learning RMS 1.54x on two; later
    # checkpoints hide both in their own round-off (the unit tests below guard each).
    # OFFSEG_TRAINED_OFFSEG_T names the checkpoint; CamVid pictures at 512x512, as the benchmark.
    import os
    from pathlib import Path

    import numpy as np
    from PIL import Image

    checkpoint = os.environ.get("OFFSEG_TRAINED_OFFSEG_T")
    if not checkpoint or not Path(checkpoint).is_file():
        pytest.skip("set OFFSEG_TRAINED_OFFSEG_T to an offseg-t checkpoint trained with the camvid recipe")
    camvid_test = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid" / "test"
    images = sorted((camvid_test / "images").glob("*.jpg"))
    if not images:
        pytest.skip("CamVid test images not found beside the repository (../shared/data/camvid)")
    model = offseg.create_model("offseg-t", checkpoint=checkpoint).eval()
    fast = optimize_for_inference(model, (512, 512))
    exact = copy.deepcopy(model).double()
    mean, std = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])

    def rms(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b).square().mean().sqrt() / b.square().mean().sqrt())

    errors: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for path in images[:3]:
        picture = np.array(Image.open(path).convert("RGB").resize((512, 512), Image.Resampling.BILINEAR))
        x = ((torch.from_numpy(picture).float() - mean) / std).permute(2, 0, 1)[None].contiguous()
        with torch.inference_mode():
            truth = exact(x.double())
        for threads in (1, 2):
            torch.set_num_threads(threads)  # the autouse fixture restores the count afterwards
            with torch.inference_mode():
                outputs = {"eager": model(x), "fast": fast(x)}
            for name, out in outputs.items():
                errors.setdefault((threads, name), []).append((rms(out, truth), rel(out, truth.float())))
            found = ", ".join(f"{n} {errors[threads, n][-1][0]:.1e} / {errors[threads, n][-1][1]:.1e}" for n in outputs)
            print(f"{path.name}, {threads} thread(s): RMS / max from float64: {found}")
    for threads in (1, 2):
        eager, fast_errors = errors[threads, "eager"], errors[threads, "fast"]
        assert sum(e[0] for e in fast_errors) <= 1.5 * sum(e[0] for e in eager)
        assert sum(e[1] for e in fast_errors) <= 2 * sum(e[1] for e in eager)


@pytest.mark.parametrize("height", [128, 104])  # 16 bands of rows; 13
def test_offset_learning_pooling_is_exact(height):
    # The softmax-weighted sum over all pixels (16 384 at 512x512): one float32 matrix product on
    # two threads (MKL, few classes, channels-last map) was 7x further from float64 than on one.
    from offseg.optimize import _pool_by_bands

    torch.manual_seed(0)
    weights = torch.randn(1, 11, height * 128).softmax(dim=2)
    x = (torch.randn(1, 256, height, 128) + 0.5).contiguous(memory_format=torch.channels_last)
    ref = torch.matmul(weights.double(), x.double().reshape(1, 256, -1).transpose(1, 2))
    for layout in (x, x.contiguous()):
        assert rel(_pool_by_bands(weights, layout).double(), ref) < 2e-7


@pytest.mark.parametrize("channels,groups", [(32, 32), (256, 32), (48, 6)])
def test_channels_last_group_norm_is_exact(channels, groups):
    # PyTorch's channels-last GroupNorm loses digits when a group's mean dwarfs its spread, and its
    # float32 moments drift on large maps even for centred data; the fast path's stays at rounding.
    from offseg.models.layers.conv_module import ConvModule
    from offseg.optimize import _CenteredGroupNorm, _FastGNConvModule

    torch.manual_seed(0)
    norm = nn.GroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    spread = torch.rand(1, channels, 1, 1) * 2
    x = (torch.randn(2, channels, 64, 48) * spread + torch.randn(1, channels, 1, 1) * 20).contiguous(
        memory_format=torch.channels_last
    )
    with torch.no_grad():
        ref = copy.deepcopy(norm).double()(x.double())
        norm.__class__ = _CenteredGroupNorm
        out = norm(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel(out.double(), ref) < 2e-7
    # The conv -> GroupNorm -> ReLU module, which normalises the conv output in place.
    module = ConvModule(channels, channels, 1, norm="GN", norm_groups=groups).eval()
    with torch.no_grad():
        module.gn.weight.normal_(), module.gn.bias.normal_()
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        conv_out = module.conv(x).double()  # what the GroupNorm sees
        ref = module.activate(copy.deepcopy(module.gn).double()(conv_out))
        module.__class__ = _FastGNConvModule
        out = module(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel(out.double(), ref) < 2e-7


def test_channel_blocks():
    from offseg.optimize import _channel_blocks

    for channels in (1, 32, 192, 193, 224, 480, 1024, 2048):
        blocks = _channel_blocks(channels, 192)
        assert blocks[0][0] == 0 and blocks[-1][1] == channels
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
        assert all(0 < end - start <= 192 for start, end in blocks)
        assert all((end - start) % 16 == 0 for start, end in blocks[:-1])
        assert len(blocks) == -(-channels // 192)


def test_pointwise_convs_run_on_onednn_in_channel_blocks():
    # On one thread PyTorch runs a 1x1 convolution of a few images with its reference kernel, about
    # 2x slower than oneDNN here; oneDNN's single running sum over 1024 channels is 2-3x further
    # from float64 (RMS) than MKL's blocked product, the fast path's blocks of channels are not.
    from torch.profiler import ProfilerActivity, profile

    from offseg.optimize import _OneDNNConv2d, _route_pointwise_convs_to_onednn

    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN")
    torch.manual_seed(0)
    conv = nn.Conv2d(1024, 120, 1)
    x = torch.randn(1, 1024, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.normal_(0, 1024**-0.5)
        ref = nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double())
    routed = nn.Sequential(copy.deepcopy(conv))
    assert _route_pointwise_convs_to_onednn(routed) == 1 and type(routed[0]) is _OneDNNConv2d
    torch.set_num_threads(1)  # the autouse fixture restores the count afterwards
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = routed(x)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_slow_conv2d_forward" not in ops and "mkldnn::_convolution_pointwise" in ops

    def rms(a: torch.Tensor) -> float:
        return float((a.double() - ref).square().mean().sqrt() / ref.square().mean().sqrt())

    assert rms(out) < 2.5e-7  # oneDNN in one call: 4-6e-7, MKL 1.9-2.6e-7, blocks of 176 channels 1.6e-7
    # A whole fast model on one thread: no 1x1 convolution by the reference kernel (PyTorch still
    # sends 3x3 ones on maps this small there), the eager model's logits.
    model = build_model(Row("segnext-t-ol", num_classes=11)).eval()
    fast = optimize_for_inference(model, size=(64, 64))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fast(x)
    ops = prof.key_averages(group_by_input_shape=True)
    assert not [e for e in ops if e.key == "aten::_slow_conv2d_forward" and e.input_shapes[1][2:] == [1, 1]]
    with torch.inference_mode():
        assert rel(out, model(x)) <= FAST_PATH_BAR["segnext-t-ol"]


def test_matrix_products_on_onednn():
    # Offset Learning's products in the fast path: oneDNN as a 1x1 convolution (MKL is 1.4-1.8x slower
    # on this project's AMD machine), summed over blocks of K as exact as MKL's product.
    from torch.profiler import ProfilerActivity, profile

    from offseg.optimize import _onednn_matmul

    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 256, generator=gen)
    weight = torch.randn(150, 256, generator=gen)
    ref = x.double() @ weight.double().T
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = _onednn_matmul(x, weight)
    assert out is not None and out.shape == (2, 300, 150) and out.is_contiguous()
    assert "mkldnn::_convolution_pointwise" in {e.key for e in prof.key_averages()}

    def rms(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b).square().mean().sqrt() / b.square().mean().sqrt())

    assert rms(out, ref) <= 1.2 * rms(x @ weight.T, ref)
    # added in place into a given output, here a row band of one image (rows contiguous)
    probs = torch.rand(1, 100, 150, generator=gen)
    mix = torch.randn(150, 150, generator=gen)
    band = out[1:, 100:200]
    expected = band.double() + probs.double() @ mix.double()
    target = band.clone()
    with torch.inference_mode():
        assert _onednn_matmul(probs, mix.T, out=target) is not None
    assert rms(target, expected) < 1e-6
    # strided rows (a batch of bands) and strided outputs: not taken, the caller uses torch.matmul
    assert _onednn_matmul(x[:, 100:200], weight) is None
    assert _onednn_matmul(probs, mix.T, out=torch.zeros(1, 150, 100).transpose(1, 2)) is None


def test_matrix_products_on_onednn_by_bands_of_rows(monkeypatch):
    # Many rows over several channel blocks: the product runs a band of rows at a time (small
    # copies of the channel blocks); the same values as in one piece.
    from offseg import optimize

    if not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 700, 256, generator=gen)
    weight = torch.randn(150, 256, generator=gen)
    with torch.inference_mode():
        whole = optimize._onednn_matmul(x, weight)
        monkeypatch.setattr(optimize, "_MATMUL_BAND_ROWS", 300)  # ragged: 1400 rows in bands of 300
        banded = optimize._onednn_matmul(x, weight)
    assert whole is not None and banded is not None and banded.shape == (2, 700, 150)
    assert rel(banded, whole) < 1e-6


@pytest.mark.parametrize("c_out", [24, 40])
def test_pointwise_conv_written_over_its_input(monkeypatch, c_out):
    from offseg import optimize

    monkeypatch.setattr(optimize, "_CONV_BAND_ROWS", 3)  # ragged bands of rows
    torch.manual_seed(0)
    conv = nn.Conv2d(40, c_out, 1, bias=True).eval()
    x = torch.randn(2, 40, 7, 5).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = conv(x)
        assert optimize._pointwise_conv_fits_over_input(conv, x)
        out = optimize._pointwise_conv_over_input(conv, x)
    assert out.shape == expected.shape and out.data_ptr() == x.data_ptr()
    assert rel(out, expected) < 1e-6
    assert not optimize._pointwise_conv_fits_over_input(nn.Conv2d(40, 48, 1), x)  # more output than input


@pytest.mark.parametrize("name", ["offseg-t", "segformer-b0-ol", "segnext-t-ol"])
def test_a_batch_runs_its_widest_parts_image_by_image(name):
    # On CPU, several images run the backbone's stem and first stage and the decode head (the
    # widest maps) one at a time: the logits of the batch are those of its images one by one, and
    # those of the eager model. SegNeXt's head draws the NMF bases of the whole batch once, as the
    # batched head does, so its logits match the eager model's for any seed.
    model = build_model(Row(name, num_classes=11)).eval()
    if name.startswith("segnext"):
        model.decode_head.set_generator(0)  # the same NMF bases on every forward
    fast = optimize_for_inference(model, size=(64, 96))
    # The first module each part calls: the backbone's first stage, the head's first projection.
    first = {"offseg-t": ("network.0", "pre.0"), "segformer-b0-ol": ("layers.0", "convs.0")}
    backbone_part, head_part = first.get(name, ("patch_embed1", "squeeze"))
    seen: dict[str, list[int]] = {"backbone": [], "head": []}
    for part, module in [
        ("backbone", fast.model.backbone.get_submodule(backbone_part)),
        ("head", fast.model.decode_head.get_submodule(head_part)),
    ]:
        module.register_forward_pre_hook(lambda _, args, part=part: seen[part].append(len(args[0])))
    x = torch.randn(3, 3, 64, 96)
    batched = fast(x).clone()
    assert seen["backbone"] == [1, 1, 1]
    assert seen["head"] == [1, 1, 1]
    bar = FAST_PATH_BAR.get(name, 1e-5)
    if not name.startswith("segnext"):  # there, an image's bases depend on its place in the batch
        one_by_one = torch.cat([fast(image).clone() for image in x.split(1)])
        assert rel(batched, one_by_one) <= bar
    with torch.no_grad():
        assert rel(batched, model(x)) <= bar
    if name.startswith("segnext"):  # the global RNG: one draw of the batch's bases, as eager makes
        for m in (model, fast.model):
            m.decode_head.set_generator(None)
        torch.manual_seed(5)
        batched = fast(x).clone()
        torch.manual_seed(5)
        with torch.no_grad():
            assert rel(batched, model(x)) <= bar


def test_optimized_offseg_is_rewritten_and_frozen():
    model = build_model(Row("offseg-t", num_classes=5)).eval()
    fast = optimize_for_inference(model, size=(64, 64))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert fast.size_divisor == 32 and fast.num_classes == 5
    with pytest.raises(RuntimeError, match="cannot be trained"):
        fast.train()
    fast.eval()  # allowed
    # offseg.predict accepts it like the original.
    from offseg.predict import predict

    image = (torch.rand(70, 90, 3) * 255).to(torch.uint8).numpy()
    assert (predict(fast, image) == predict(model, image)).mean() > 0.99


@pytest.mark.parametrize("name", ["offseg-t", "segformer-b0-ol", "segnext-t-ol"])
def test_optimized_model_converts_to_float64(name):
    # Every tensor the fast path prepared follows `.double()` (buffers, caches keyed by dtype), also
    # after a float32 call filled the caches. The folded weights keep the float32 rounding of the
    # folding, hence the float32 bar.
    model = build_model(Row(name, num_classes=11)).eval()
    fast = optimize_for_inference(model, size=(64, 64))
    x = torch.randn(1, 3, 64, 96)
    fast(x)
    fast64 = fast.double()
    assert fast64.state_dict().keys() == fast.state_dict().keys()  # the prepared buffers stay out
    out = fast64(x.double())
    with torch.no_grad():
        ref = model.double()(x.double())
    assert out.dtype == torch.float64 and rel(out, ref) <= FAST_PATH_BAR.get(name, 1e-5)


def test_fold_batch_norms_is_exact():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
    realistic_weights(model, seed=3)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert fold_batch_norms(model) == 1
        assert isinstance(model[1], nn.Identity)
        assert rel(model(x), ref) < 1e-6


@pytest.mark.parametrize("offset_learning", [False, True])
@pytest.mark.parametrize("channels", [16, 272])  # the finest level's share: one oneDNN call; two blocks
def test_segformer_fusion_split_over_levels(offset_learning, channels):
    # The fast path computes each level's share of the fusion conv at the level's resolution and
    # sums the resized shares: the same function as resizing, concatenating and fusing.
    from torch.profiler import ProfilerActivity, profile

    from offseg.models.heads.segformer_head import SegformerHead, SegformerHeadOffsetLearning

    torch.manual_seed(0)
    head_class = SegformerHeadOffsetLearning if offset_learning else SegformerHead
    head = realistic_weights(head_class([8, 16, 24, 32], num_classes=5, channels=channels), seed=1).eval()
    shapes = [(12, 20), (6, 10), (3, 5), (2, 3)]  # non-square, one ratio not an integer
    inputs = [torch.randn(2, c, h, w, dtype=torch.float64) for c, (h, w) in zip([8, 16, 24, 32], shapes, strict=True)]
    exact = copy.deepcopy(head).double()
    with torch.no_grad():
        ref_fused, ref = exact.fuse(inputs), exact(inputs)
    for dtype in (torch.float64, torch.float32):  # float32: the oneDNN sum-and-ReLU into the resized shares
        fast = optimize_for_inference(copy.deepcopy(head).to(dtype)).model
        assert type(fast).__name__.startswith("_FastSegformerHead") and not hasattr(fast, "fusion_conv")
        bar = 1e-12 if dtype == torch.float64 else 2e-6
        for layout in (torch.contiguous_format, torch.channels_last):
            x = [t.to(dtype).contiguous(memory_format=layout) for t in inputs]
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                fused = fast.fuse(x)
            assert rel(fused.double(), ref_fused) < bar
            with torch.inference_mode():
                assert rel(fast(x).double(), ref) < bar
        if dtype == torch.float32 and torch.backends.mkldnn.is_available():
            assert "mkldnn::_convolution_pointwise_" in {e.key for e in prof.key_averages()}
    with pytest.raises(ValueError, match="expected 4 feature maps"):
        fast.fuse(x[:3])


def test_optimized_mask2former_runs():
    model = offseg.create_model("mask2former-swin-t-ol", num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    assert rel(optimize_for_inference(model)(x), ref) <= 1e-4


# --------------------------------------------------------------------------------------------
# The benchmark's helpers
# --------------------------------------------------------------------------------------------


def test_bench_table_and_errors():
    rows = [
        Result(Row("offseg-t", "reference"), [10.0, 12.0, 11.0], 500.0),
        Result(Row("offseg-t", "fast"), [4.0, 5.0, 6.0], 250.0, rel_error=1e-6, flop_limit_ms=2.0, cpu_kernel_s=0.3),
    ]
    rows[1].cpu_total_s = 1.2
    table = format_table(rows)
    assert (
        "| offseg-t fast forward | 1 | 512x512 | 5 | 4-6 | 200.00 | 0.45 | 2.5 | 25 % | 250 | 0.50 | 1.0e-06 |" in table
    )
    assert "| offseg-t reference forward | 1 | 512x512 | 11 | 10-12 | 90.91 | 1.00 | - | - | 500 |" in table
    assert relative_error(torch.ones(3) * 2.0, torch.ones(3)) == 1.0
    assert relative_error(torch.ones(2), torch.ones(3)) == float("inf")


def test_bench_cli_rejects_bad_arguments(capsys):
    from offseg.cli.main import main

    assert main(["bench", "--model", "no-such-model", "--no-memory"]) == 1
    assert main(["bench", "--size", "100", "100", "--no-memory"]) == 1
    assert main(["bench", "--train", "--backend", "onnxruntime", "--no-memory"]) == 1
    assert "error" in capsys.readouterr().err


def test_bench_cli_small_run(capsys):
    from offseg.cli.main import main

    assert (
        main(["bench", "--model", "offseg-t", "--size", "64", "64", "--runs", "1", "--warmup", "0", "--no-memory"]) == 0
    )
    out = capsys.readouterr().out
    assert "offseg-t reference forward" in out and "offseg-t fast forward" in out


@pytest.mark.slow  # about a minute: the full-size Swin-T model, three rows
def test_bench_cli_mask2former(capsys):
    from offseg.cli.main import main

    assert (
        main(
            [
                "bench",
                "--model",
                "mask2former-swin-t-ol",
                "--size",
                "64",
                "64",
                "--num-classes",
                "5",
                "--runs",
                "1",
                "--warmup",
                "0",
                "--no-memory",
            ]
        )
        == 0
    )
    assert "mask2former-swin-t-ol fast forward" in capsys.readouterr().out


def test_carafe_export_formulation_equals_reference():
    from offseg.models.layers.carafe import _carafe_for_export

    torch.manual_seed(0)
    for n, c, h, w, k, g, s in [(2, 8, 5, 6, 5, 1, 2), (1, 6, 4, 3, 3, 2, 1), (1, 8, 4, 4, 5, 4, 2)]:
        feats = torch.randn(n, c, h, w, dtype=torch.float64)
        masks = torch.randn(n, g * k * k, h * s, w * s, dtype=torch.float64)
        assert rel(_carafe_for_export(feats, masks, k, g, s), carafe_reference(feats, masks, k, g, s)) < 1e-12
        # masks given as logits: the softmax over each position's taps taken inside
        kernels = masks.view(n, g, k * k, h * s, w * s).softmax(dim=2).view(masks.shape)
        inside = _carafe_for_export(feats, masks, k, g, s, softmax=True)
        assert rel(inside, carafe_reference(feats, kernels, k, g, s)) < 1e-12


def test_grid_sample_export_formulation_equals_grid_sample():
    import torch.nn.functional as F

    from offseg.models.layers.freqfusion import _grid_sample_for_export

    torch.manual_seed(0)
    for (n, c, h, w), (ho, wo) in [((2, 3, 7, 9), (14, 18)), ((4, 5, 1, 6), (2, 12))]:
        feats = torch.randn(n, c, h, w, dtype=torch.float64)
        coords = torch.rand(n, ho, wo, 2, dtype=torch.float64) * 2.6 - 1.3  # beyond the border too
        coords[0, 0, :4] = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
        expected = F.grid_sample(feats, coords, mode="bilinear", padding_mode="border", align_corners=False)
        assert rel(_grid_sample_for_export(feats, coords), expected) < 1e-12


def test_fast_model_for_reuses_until_the_weights_change():
    from offseg.optimize import InferenceModel, fast_model_for

    model = build_model(Row("offseg-t", num_classes=4)).eval()
    first = fast_model_for(model)
    assert isinstance(first, InferenceModel) and fast_model_for(model) is first and fast_model_for(first) is first
    with torch.no_grad():
        model.decode_head.offset_learning.cls_repr.mul_(2)
    second = fast_model_for(model)
    assert second is not first
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel(second(x), model(x)) <= 1e-4


def test_the_output_buffer_is_reused_only_once_nothing_refers_to_it():
    from offseg.optimize import _ReusedOutput

    pool, like, shape = _ReusedOutput(), torch.zeros(1), (1, 16, 512, 512)  # 16 MiB: large enough
    first = pool.empty(shape, like)
    if first is None:
        pytest.skip("no anonymous memory maps with huge-page advice on this platform")
    first.fill_(1.0)
    second = pool.empty(shape, like)  # the first is alive: a buffer of its own
    assert second.data_ptr() != first.data_ptr()
    plane = second[0, 3].fill_(2.0)  # a view keeps the storage, and so the buffer, referenced
    second_ptr = second.data_ptr()
    del second
    third = pool.empty(shape, like)
    assert third.data_ptr() != second_ptr
    third_ptr = third.data_ptr()
    del third
    fourth = pool.empty(shape, like)  # nothing refers to the third's buffer any more
    assert fourth.data_ptr() == third_ptr
    del fourth
    assert pool.empty((1, 17, 512, 512), like).data_ptr() != third_ptr  # another size: a fresh buffer
    assert bool((first == 1.0).all()) and bool((plane == 2.0).all())  # nothing written over live outputs
    assert copy.deepcopy(pool)._buffer is None
