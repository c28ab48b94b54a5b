"""Every registered model builds, runs forward and backward, and returns logits at the input
size — at 64x64 and at 512x512. Heavy: run with `pytest -m slow` (the default suite covers the
smallest model of each family in its own test file)."""

import pytest
import torch

import offseg

ALL_MODELS = offseg.list_models()


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 512])
@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_at_input_size(name, size):
    torch.manual_seed(0)
    model = offseg.create_model(name, num_classes=11).train()
    x = torch.randn(1 if size == 512 else 2, 3, size, size)
    out = model(x)
    assert out.shape == (x.shape[0], 11, size, size)
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 11, size, size)


def test_every_family_is_registered():
    families = {name.split("-")[0] for name in ALL_MODELS}
    assert {"offseg", "segformer", "segnext", "mask2former"} <= families
    assert len(ALL_MODELS) == 12 + 12 + 8 + 2


@pytest.mark.parametrize("name", ["offseg-t-co", "segformer-b0-ol", "segnext-t", "mask2former-swin-t-ol"])
def test_unknown_option_names_the_model_and_what_it_accepts(name):
    # The variant's own arguments (size, head type) are fixed by its name, not options.
    with pytest.raises(
        TypeError, match=rf"^{name}: unknown option\(s\) offset_learning, sizes?; accepted: .*drop_path_rate"
    ):
        offseg.create_model(name, size="b1", offset_learning=True)


def test_builders_have_names_and_docs():
    from offseg.models.registry import get_builder

    for name in ALL_MODELS:
        builder = get_builder(name)
        assert builder.__name__ == name.replace("-", "_") and builder.__doc__
