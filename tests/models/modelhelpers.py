"""Checks shared by the model-family tests."""

from __future__ import annotations

import torch

import offseg


def check_train_step(name: str, logits_size: tuple[int, int], offset_learning: bool) -> None:
    """One forward/backward of `name` (5 classes) on a 2x3x64x64 batch: the head's raw logits are
    `logits_size`, the model's output is at input size, and every parameter gets a finite gradient,
    except the per-pixel `conv_seg` of an Offset Learning head, which is built only so official
    checkpoints load and is never used."""
    torch.manual_seed(0)
    model = offseg.create_model(name, num_classes=5)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_logits(x).shape == (2, 5, *logits_size)
    out = model(x)
    assert out.shape == (2, 5, 64, 64)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        if "conv_seg" in pname and offset_learning:
            assert p.grad is None, pname
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
