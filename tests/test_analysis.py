"""offseg.analysis and `offseg analyze`: the ideal class representation W* = M (E^T)^+ on cases
where it is known exactly, Offset Learning's quantities against `align_by_offsets`, and both
commands end to end on tiny randomly initialised models (real CamVid images when present)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from offseg.analysis import (
    analyze_ideal_representation,
    cosine_similarity_matrix,
    downsample_label,
    extract_features,
    ideal_class_representation,
    mean_off_diagonal,
    model_class_representation,
    offset_quantities,
    one_hot_masks,
    resolve_classes,
)
from offseg.cli.main import main
from offseg.inference import pad_to_divisor
from offseg.models import registry
from offseg.models.heads.offseg_head import OffSegHead
from offseg.models.heads.segformer_head import SegformerHead, SegformerHeadOffsetLearning
from offseg.models.layers.offset_learning import align_by_offsets
from offseg.models.segmentor import Segmentor

CAMVID_ROOT = Path("/work/shared/data/camvid")
CAMVID_MISSING = not (CAMVID_ROOT / "val" / "images").is_dir()
CAMVID_REASON = f"CamVid data not found at {CAMVID_ROOT}"
CAMVID_CLASSES = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
]
pytest.importorskip("matplotlib", reason="figures need matplotlib (the 'plot' extra)")


# --- tiny models ------------------------------------------------------------------------------
class TinyPyramid(nn.Module):
    """Four feature levels at strides 4, 8, 16, 32, like the real backbones, in a few convolutions."""

    def __init__(self, channels=(8, 8, 16, 16)) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels[0], 4, stride=4)
        self.downs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(channels[:-1], channels[1:], strict=True)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = [torch.relu(self.stem(x))]
        for down in self.downs:
            levels.append(torch.relu(down(levels[-1])))
        return levels


def tiny_model(head: str = "offseg", classifier: str = "offset", num_classes: int = 11, seed: int = 0) -> Segmentor:
    torch.manual_seed(seed)
    channels = (8, 8, 16, 16)
    if head == "offseg":
        # FreqFusion wants (lr + hr) // 4 divisible by 8 at every step.
        decode_head = OffSegHead(
            channels, (32, 32, 32, 32), num_classes, channels=16, norm_groups=4, classifier=classifier
        )
    elif head == "segformer-ol":
        decode_head = SegformerHeadOffsetLearning(channels, num_classes, channels=16)
    else:
        decode_head = SegformerHead(channels, num_classes, channels=16)
    model = Segmentor(TinyPyramid(channels), decode_head, size_divisor=32, name=f"tiny-{head}-{classifier}")
    offset_learning = getattr(decode_head, "offset_learning", None)
    if offset_learning is not None:
        # Larger than the 0.02 init, so the softmaxes are far from uniform and the offsets matter.
        with torch.no_grad():
            offset_learning.cls_repr.normal_(0, 1.0)
            for proj in (
                getattr(offset_learning, "cls_offset_proj", None),
                getattr(offset_learning, "feat_offset_proj", None),
            ):
                if proj is not None:
                    proj.weight.normal_(0, 0.3)
    return model.eval()


def random_image(height: int = 70, width: int = 100, seed: int = 1) -> torch.Tensor:
    return torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed))


# --- the ideal class representation on exact cases ----------------------------------------------
def test_full_rank_features_recover_the_true_class_matrix():
    # E of full column rank built so that W_true E^T is one-hot: each pixel of class y is the
    # y-th column of W_true^+ plus a component in the null space of W_true.
    gen = torch.Generator().manual_seed(0)
    num_pixels, channels, num_classes = 300, 12, 4
    w_true = torch.randn(num_classes, channels, generator=gen, dtype=torch.float64)
    right_inverse = torch.linalg.pinv(w_true)  # C x K, W_true @ right_inverse = I
    null_basis = torch.linalg.svd(w_true).Vh[num_classes:].T  # C x (C - K), W_true @ null_basis = 0
    labels = torch.arange(num_pixels) % num_classes
    feats = (
        right_inverse[:, labels].T
        + (null_basis @ torch.randn(channels - num_classes, num_pixels, generator=gen, dtype=torch.float64)).T
    )
    masks = one_hot_masks(labels, num_classes)
    assert torch.allclose(w_true @ feats.T, masks, atol=1e-10)  # the construction is exact
    assert torch.linalg.matrix_rank(feats) == channels

    w_star = ideal_class_representation(feats.float(), masks)  # float32 features, as from a network
    assert w_star.dtype == torch.float64 and w_star.shape == (num_classes, channels)
    assert torch.allclose(w_star, w_true, atol=1e-5)
    assert torch.equal((w_star @ feats.T).argmax(dim=0), labels)


def test_orthonormal_class_directions_give_the_minimum_norm_solution():
    # Rank-deficient E (rank K < C): every pixel of class k is s * u_k for orthonormal u_k. Any
    # W with W_k . u_j = delta_kj / s fits; the pseudo-inverse picks the smallest, u_k / s.
    gen = torch.Generator().manual_seed(1)
    channels, num_classes, scale = 16, 5, 3.0
    directions = torch.linalg.qr(torch.randn(channels, num_classes, generator=gen, dtype=torch.float64)).Q.T  # K x C
    labels = torch.tensor([k for k in range(num_classes) for _ in range(7 + k)])
    feats = scale * directions[labels]
    w_star = ideal_class_representation(feats, one_hot_masks(labels, num_classes))
    assert torch.allclose(w_star, directions / scale, atol=1e-5)
    assert torch.equal((w_star @ feats.T).argmax(dim=0), labels)
    # A class absent from the image has a zero row.
    absent = ideal_class_representation(feats, one_hot_masks(labels, num_classes + 1))
    assert torch.count_nonzero(absent[num_classes]) == 0


def test_rcond_discards_directions_of_rounding_noise():
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(40) % 2
    feats = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    feats[:, 2] = feats[:, 0] + 1e-9 * torch.randn(40, generator=gen, dtype=torch.float64)  # nearly dependent
    masks = one_hot_masks(labels, 2)
    assert ideal_class_representation(feats, masks, rcond=1e-6).norm() < 10  # the near-null direction is cut
    assert ideal_class_representation(feats, masks, rcond=0.0).norm() > 1e3  # kept, it blows W* up


def test_labels_are_voted_down_by_majority():
    label = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 255], [3, 3, 255, 255], [3, 2, 255, 255]])
    assert downsample_label(label, (2, 2)).tolist() == [[0, 1], [3, 255]]
    tie = torch.tensor([[4, 255], [4, 255]])
    assert downsample_label(tie, (1, 1)).tolist() == [[4]]  # a real class wins a tie with ignore
    assert torch.equal(downsample_label(label, (4, 4)), label)


def test_similarity_helpers_and_class_names():
    rows = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    sim = cosine_similarity_matrix(rows)
    assert torch.allclose(sim, torch.tensor([[1.0, 0, -1], [0, 1, 0], [-1, 0, 1]], dtype=torch.float64))
    assert mean_off_diagonal(sim) == pytest.approx(-1 / 3)
    assert math.isnan(mean_off_diagonal(sim[:1, :1]))
    assert resolve_classes(["road", "0", "Road"], ["Sky", "Road"]) == [1, 0]
    with pytest.raises(ValueError, match="unknown class"):
        resolve_classes(["grass"], ["Sky", "Road"])


# --- features and offsets of real heads --------------------------------------------------------
@pytest.mark.parametrize("head, stride", [("offseg", 4), ("segformer-ol", 8), ("segformer", 4)])
def test_features_are_the_classifier_input_at_head_resolution(head, stride):
    model = tiny_model(head, num_classes=5)
    image = random_image(70, 100)
    feats, logits = extract_features(model, image)
    rows, cols = math.ceil(70 / stride), math.ceil(100 / stride)
    assert feats.shape == (16, rows, cols) and logits.shape == (5, rows, cols)
    with torch.no_grad():
        padded = pad_to_divisor(image[None], 32)
        direct = model.decode_head.fuse(model.backbone(padded))
        if head == "segformer-ol":
            direct = model.decode_head.maxpool(direct)
        direct_logits = model.forward_logits(padded)
    assert torch.equal(feats, direct[0, :, :rows, :cols])
    assert torch.equal(logits, direct_logits[0, :, :rows, :cols])
    weight = model_class_representation(model)
    assert weight.shape == (5, 16)
    if head == "segformer":  # a per-pixel head: W is conv_seg and the logits are W E + b
        recomputed = torch.einsum("kc,chw->khw", weight, feats) + model.decode_head.conv_seg.bias[:, None, None]
        assert torch.allclose(recomputed, logits, atol=1e-5)


@pytest.mark.parametrize("classifier", ["offset", "offset-class", "offset-feature"])
def test_offset_quantities_match_align_by_offsets(classifier):
    # 70 x 100 is padded to 96 x 128: the model's softmax over space also covers the padding
    # (24 x 32 cells at 1/4), and the returned maps are cropped to the image's 18 x 25 cells.
    model = tiny_model("offseg", classifier, num_classes=6)
    image = random_image(70, 100)
    quantities = offset_quantities(model, image)
    module = model.decode_head.offset_learning
    with torch.no_grad():
        padded = pad_to_divisor(image[None], 32)
        full = model.decode_head.fuse(model.backbone(padded))[0]  # C, 24, 32
        logits = model.forward_logits(padded)[0, :, :18, :25]
    channels = full.shape[0]
    pixels = full.reshape(channels, -1).T[None]  # 1, HW, C
    with torch.no_grad():
        aligned_repr, aligned_feats = align_by_offsets(
            pixels, module.cls_repr, getattr(module, "cls_offset_proj", None), getattr(module, "feat_offset_proj", None)
        )
    cls_repr = module.cls_repr[0].detach()
    assert torch.equal(quantities["class_repr"], cls_repr)
    assert quantities["map_size"] == (24, 32) and quantities["features"].shape == (channels, 18, 25)
    coupled = torch.einsum("kc,chw->khw", cls_repr, full)
    assert torch.allclose(quantities["coupled_attn"], coupled[:, :18, :25], atol=1e-5)
    assert torch.allclose(
        quantities["class_attn"], coupled.flatten(1).softmax(1).reshape(6, 24, 32)[:, :18, :25], atol=1e-6
    )
    assert torch.allclose(quantities["position_attn"].sum(dim=0), torch.ones(18, 25), atol=1e-5)

    expected_dw = aligned_repr[0] - cls_repr
    expected_de = (aligned_feats[0] - pixels[0]).T.reshape(channels, 24, 32)[:, :18, :25]
    if classifier == "offset-feature":
        assert quantities["class_offsets"] is None and quantities["class_offset_norm"] is None
    else:
        assert expected_dw.abs().max() > 1e-3  # the offsets are not trivially zero
        assert torch.allclose(quantities["class_offsets"], expected_dw, atol=1e-5)
        assert torch.allclose(quantities["class_offset_norm"], expected_dw.norm(dim=1), atol=1e-5)
    if classifier == "offset-class":
        assert quantities["feature_offsets"] is None and quantities["feature_offset_norm"] is None
    else:
        assert expected_de.abs().max() > 1e-3
        assert torch.allclose(quantities["feature_offsets"], expected_de, atol=1e-5)
        assert torch.allclose(quantities["feature_offset_norm"], expected_de.norm(dim=0), atol=1e-5)
    assert torch.allclose(quantities["aligned_class_repr"], aligned_repr[0], atol=1e-5)
    # LayerNorm_K((E + dE)(W + dW)^T) is exactly what the head returned.
    assert torch.allclose(quantities["masks"], logits, atol=1e-4)
    assert torch.allclose(quantities["logits"], logits) and quantities["stride"] == 4


def test_per_pixel_models_have_no_offsets():
    with pytest.raises(ValueError, match="no offsets to show"):
        offset_quantities(tiny_model("offseg", "pixel"), random_image(32, 32))


class ToyDataset:
    """Test-pipeline items with an ignored band, to check that ignored cells stay out of W*."""

    class_names = ["a", "b", "c"]
    ignore_index = 255

    def __init__(self, count: int = 3) -> None:
        self.items = []
        for i in range(count):
            gen = torch.Generator().manual_seed(10 + i)
            label = torch.randint(0, 3, (8, 12), generator=gen).repeat_interleave(8, 0).repeat_interleave(8, 1)
            label[:8] = 255  # the first two rows of feature cells are ignored
            self.items.append(
                {"image": torch.randn(3, 64, 96, generator=gen), "label": label, "image_path": f"toy_{i}.png"}
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@pytest.mark.parametrize("head", ["offseg", "segformer"])
def test_ideal_representation_analysis_on_toy_data(head):
    model = tiny_model(head, num_classes=3)
    dataset = ToyDataset()
    analysis = analyze_ideal_representation(model, dataset, [0, 1, 2])
    assert analysis.kind == ("offset" if head == "offseg" else "pixel")
    assert analysis.stride == 4 and analysis.classes == [0, 1, 2]
    # Direct recomputation for image 0 from its labelled cells only.
    feats, logits = extract_features(model, dataset[0]["image"])
    label = downsample_label(dataset[0]["label"], feats.shape[-2:])
    keep = (label != 255).reshape(-1)
    assert not keep[:48].any() and keep[48:].all()  # 8 label rows = 2 rows of 24 cells
    rows = feats.reshape(16, -1).T[keep]
    expected = ideal_class_representation(rows, one_hot_masks(label.reshape(-1)[keep], 3))
    assert torch.allclose(analysis.ideal_repr[0], expected, atol=1e-10)
    assert analysis.feature_rank[0] == 16
    assert analysis.pixel_counts[0].sum() == keep.sum()
    # The fixed W is the same in every image; W + dW (Offset Learning only) is not.
    assert mean_off_diagonal(analysis.similarity(0, "model")) == pytest.approx(1.0)
    if head == "offseg":
        assert analysis.aligned_repr.shape == (3, 3, 16)
        assert mean_off_diagonal(analysis.similarity(0, "aligned")) < 1 - 1e-6
    else:
        assert analysis.aligned_repr is None
    summary = analysis.summary()
    assert 0 <= summary["ideal_mIoU"] <= 100 and summary["ideal_mIoU"] > summary["model_mIoU"]
    json.dumps(summary)  # JSON-ready


# --- the commands ------------------------------------------------------------------------------
@pytest.fixture
def tiny_registered(monkeypatch):
    # SegFormer heads: no FreqFusion, so a CamVid-sized forward takes milliseconds.
    for name, (head, classifier) in {
        "tiny-ol": ("segformer-ol", "offset"),
        "tiny-pixel": ("segformer", "pixel"),
    }.items():
        monkeypatch.setitem(
            registry._BUILDERS,
            name,
            lambda num_classes=150, _h=head, _c=classifier, **kw: tiny_model(_h, _c, num_classes=num_classes),
        )


@pytest.mark.skipif(CAMVID_MISSING, reason=CAMVID_REASON)
def test_cli_ideal_repr_on_camvid(tmp_path, tiny_registered, capsys):
    out = tmp_path / "ideal"
    code = main(
        [
            "analyze",
            "ideal-repr",
            "--model",
            "tiny-ol",
            "--data",
            "camvid",
            "--data-root",
            str(CAMVID_ROOT),
            "--images",
            "2",
            "--classes",
            "Road",
            "sky",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "recomputed argmax W* E^T" in printed and "Road" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert [c["name"] for c in summary["classes"]] == ["Road", "Sky"]
    assert len(summary["images"]) == 2 and summary["stride"] == 8
    assert summary["ideal_mIoU"] > summary["model_mIoU"]
    for name in summary["files"]:
        assert (out / name).is_file(), name
    assert {"similarity/03_road.png", "similarity/00_sky.png", "similarity.png", "masks.png"} <= set(summary["files"])
    assert (out / "masks.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(CAMVID_MISSING, reason=CAMVID_REASON)
def test_cli_offsets_on_camvid(tmp_path, tiny_registered, capsys):
    images = sorted((CAMVID_ROOT / "val" / "images").glob("*.jpg"))[:2]
    out = tmp_path / "offsets"
    code = main(
        [
            "analyze",
            "offsets",
            *map(str, images),
            "--model",
            "tiny-ol",
            "--palette",
            "camvid",
            "--classes",
            "Road",
            "Car",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    for image in images:
        figure = out / f"{image.stem}_offsets.png"
        assert figure.is_file() and figure.read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "offsets.json").read_text())
    first = report["images"][str(images[0])]
    assert first["classes_shown"] == ["Road", "Car"] and set(first["class_offset_norm"]) == set(CAMVID_CLASSES)

    # A per-pixel model is refused in one line.
    code = main(
        ["analyze", "offsets", str(images[0]), "--model", "tiny-pixel", "--palette", "camvid", "--out", str(out)]
    )
    assert code == 1 and "no offsets to show" in capsys.readouterr().err


def test_cli_analyze_without_analysis_prints_help(capsys):
    assert main(["analyze"]) == 2
    assert "ideal-repr" in capsys.readouterr().out
