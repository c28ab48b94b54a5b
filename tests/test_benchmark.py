"""The benchmark's reference row computes the official function (against the shared vectors),
the labels-only prediction path gives the argmax of the logits, and the engine's pieces work."""

import pytest
import torch

import offseg
from offseg.benchmark import Row, build_model, label_mismatch, measure_memory
from offseg.inference import infer, whole_labels
from offseg.models.layers.resample import bilinear_matrix
from offseg.optimize import optimize_for_inference, reference_computation
from reference import TOLERANCE, assert_close, load_vector

# --------------------------------------------------------------------------------------------
# The reference row against the official outputs
# --------------------------------------------------------------------------------------------


def test_reference_row_reproduces_official_offseg_t():
    vec = load_vector("offseg_t")
    model = offseg.create_model("offseg-t")
    offseg.load_checkpoint(model, vec.weights)
    model.eval()
    with torch.inference_mode(), reference_computation():
        logits = model.forward_logits(vec["input.image"])
        resized = model(vec["input.image"])
    assert_close(logits, vec["output.logits"], TOLERANCE["model"], "logits")
    assert_close(resized, vec["output.logits_resized"], TOLERANCE["model"], "logits_resized")


def test_reference_row_reproduces_official_segformer_b0_ol():
    vec = load_vector("segformer_b0_offset_learning")
    model = offseg.create_model("segformer-b0-ol")
    offseg.load_checkpoint(model, vec.weights)
    model.eval()
    with torch.inference_mode(), reference_computation():
        logits = model.forward_logits(vec["input.image"])
    assert_close(logits, vec["output.logits"], TOLERANCE["model"], "logits")


# --------------------------------------------------------------------------------------------
# Labels only
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b", [(16, 64), (64, 16), (17, 50), (50, 50), (100, 37)])
def test_bilinear_matrix_is_pytorch_resize(a, b):
    x = torch.randn(3, a, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(x[None, :, :, None], size=(b, 1), mode="bilinear", align_corners=False)
    assert torch.allclose(x @ bilinear_matrix(a, b).T, ref[0, :, :, 0], atol=1e-12)


def _check_labels(model, x, out_size=None, tile_rows=32):
    with torch.inference_mode():
        logits = infer(model, x, out_size=out_size)
        labels = whole_labels(model, x, out_size=out_size, tile_rows=tile_rows)
    assert labels.dtype == torch.long and labels.shape == (x.shape[0], *logits.shape[2:])
    assert label_mismatch(labels, logits) == 0.0
    # Away from near-ties, every label is the argmax.
    assert (labels == logits.argmax(1)).float().mean() > 0.99


@pytest.mark.parametrize(
    "name,size,out_size",
    [
        ("offseg-t", (96, 128), None),  # no padding, output at the input size
        ("offseg-t", (70, 90), None),  # padded to 96x96, cropped back
        ("offseg-t", (70, 90), (123, 77)),  # ... then resized to another size (the test scale)
        ("segformer-b0-ol", (64, 96), (50, 200)),  # 1/8-resolution logits
    ],
)
def test_labels_only_equal_argmax_of_logits(name, size, out_size):
    model = build_model(Row(name, num_classes=13)).eval()
    x = torch.randn(2, 3, *size)
    _check_labels(optimize_for_inference(model), x, out_size, tile_rows=7)  # several bands, a ragged last one
    _check_labels(model, x, out_size)


def test_labels_of_a_batch_of_differently_sized_images():
    # What the server's batches are: images of different sizes that pad to the same input; each one's
    # labels, at its own output size, are those of whole_labels on that image alone (float64: the
    # batched kernels leave no near-tie to flip).
    from offseg.inference import whole_labels_each

    model = build_model(Row("offseg-t", num_classes=7)).eval().double()
    gen = torch.Generator().manual_seed(3)
    images = [
        torch.randn(3, 70, 90, generator=gen, dtype=torch.float64),
        torch.randn(3, 65, 80, generator=gen, dtype=torch.float64),
    ]
    sizes, out_sizes = [(70, 90), (65, 80)], [(123, 77), (65, 80)]  # both padded to 96 x 96
    batch = torch.zeros(2, 3, 96, 96, dtype=torch.float64)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[1], : image.shape[2]] = image
    with torch.inference_mode():
        each = whole_labels_each(model, batch, sizes, out_sizes)
        alone = [
            whole_labels(model, image[None], out_size=out)[0] for image, out in zip(images, out_sizes, strict=True)
        ]
    assert [tuple(m.shape) for m in each] == out_sizes
    assert all(torch.equal(a, b) for a, b in zip(each, alone, strict=True))
    with pytest.raises(ValueError, match="2 images, 1 sizes"):
        whole_labels_each(model, batch, sizes[:1], out_sizes[:1])


def test_predict_gives_the_labels_of_the_logits():
    model = build_model(Row("offseg-t", num_classes=9)).eval()
    image = (torch.rand(75, 101, 3) * 255).to(torch.uint8).numpy()
    labels = offseg.predict(model, image, scale=(128, 64))  # resized, padded, cropped, resized back
    from offseg.predict import preprocess

    x, size = preprocess(image, (128, 64))
    with torch.inference_mode():
        logits = infer(offseg.optimize.fast_model_for(model), x[None], out_size=size)
    assert labels.shape == (75, 101)
    assert label_mismatch(torch.from_numpy(labels)[None], logits) == 0.0


def test_label_mismatch_counts_only_decided_pixels():
    logits = torch.tensor([[[[1.0, 2.0]], [[1.0005, 0.0]]]])  # pixel 0: near-tie; pixel 1: class 0 by far
    assert label_mismatch(torch.tensor([[[0, 0]]]), logits) == 0.0
    assert label_mismatch(torch.tensor([[[0, 1]]]), logits) == 1.0


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


def test_memory_worker_reports_memory_above_torch(tmp_path):
    info = measure_memory(Row("offseg-t", "labels", size=(64, 64), num_classes=5), threads=1, runs=1, workdir=tmp_path)
    assert 0 < info["build_rss_mb"] <= info["peak_rss_mb"] < info["torch_rss_mb"] + 2000
