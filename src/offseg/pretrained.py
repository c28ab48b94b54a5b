"""ImageNet initialisation of backbones from their usual release files.

Weights are handled here, apart from the model code. `load_backbone_weights(model, path)` reads the
file without executing pickled code, converts its key names to the backbone's when the release
uses other names, loads what fits and reports what was loaded, what stays at its initial value
(new) and what the file had that the backbone does not use (classification heads).

Release formats per backbone class:
- EfficientFormerV2: the snap-research release, {'model': {'patch_embed.*', 'network.*', 'norm.*',
  'head.*', 'dist_head.*'}}. Names already match; the 224-pixel `attention_biases` tables land in
  the unused legacy buffers and the `attention_biases_seg` tables start at zero, as in the
  official fine-tuning. The classifier (norm, head, dist_head) is reported unused.
- MixVisionTransformer (MiT-B0..B5), three namings (see `convert_mit`):
  the SegFormer release (NVlabs: `patch_embed1.proj`, `block1.0.attn.q` / `attn.kv`, `norm1`, `head`),
  MMSegmentation's converted files (our names already), and Hugging Face `transformers`
  (`segformer.encoder.patch_embeddings.0.proj`, `block.0.0.attention.self.query` / `key` / `value`,
  `layer_norm.0`, `classifier`).
- MSCAN (SegNeXt): the SegNeXt release (Visual-Attention-Network) names the depthwise conv of the
  MLP `mlp.dwconv.dwconv`, MMSegmentation `mlp.dwconv`; everything else already matches. Its
  classifier (`head.*`) is reported unused.
- SwinTransformer: the Microsoft release ({'model': {'patch_embed.proj', 'layers.*', 'norm.*',
  'head.*'}}, see `convert_swin`) and MMSegmentation's converted files (our names already). The
  release's patch-merging weights are re-ordered to our `nn.Unfold` layout; its classifier head and
  its attention-mask buffers are dropped, its final `norm` is reported unused, and the per-stage output
  norms `norm0`..`norm3` are new.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, read_state_dict

# backbone class name -> function mapping a release state dict to the backbone's key names
KEY_CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {}


def register_key_converter(class_name: str):
    def decorator(fn):
        KEY_CONVERTERS[class_name] = fn
        return fn

    return decorator


# --- MiT ----------------------------------------------------------------------------------------
# Our names (MMSegmentation's): stage i (0-based) is layers.i = [patch embedding, blocks, norm].
#   layers.i.0.projection / layers.i.0.norm                       patch embedding conv / LayerNorm
#   layers.i.1.j.norm1, .norm2                                    block LayerNorms
#   layers.i.1.j.attn.attn.in_proj_weight / in_proj_bias          packed [q; k; v] projection
#   layers.i.1.j.attn.attn.out_proj, .attn.sr, .attn.norm         output proj, reduction conv + LN
#   layers.i.1.j.ffn.layers.{0,1,4}                               fc1 (1x1 conv), depthwise 3x3, fc2
#   layers.i.2                                                    stage LayerNorm
# The releases use nn.Linear for q / kv / fc1 / fc2: 2-D weights; fc1 and fc2 become 1x1 convs.

_MIT_SEGFORMER_RULES = [  # SegFormer release, stages numbered from 1
    (r"patch_embed(\d+)\.proj\.(.+)", "layers.{s}.0.projection.{1}"),
    (r"patch_embed(\d+)\.norm\.(.+)", "layers.{s}.0.norm.{1}"),
    (r"block(\d+)\.(\d+)\.norm([12])\.(.+)", "layers.{s}.1.{1}.norm{2}.{3}"),
    (r"block(\d+)\.(\d+)\.attn\.proj\.(.+)", "layers.{s}.1.{1}.attn.attn.out_proj.{2}"),
    (r"block(\d+)\.(\d+)\.attn\.sr\.(.+)", "layers.{s}.1.{1}.attn.sr.{2}"),
    (r"block(\d+)\.(\d+)\.attn\.norm\.(.+)", "layers.{s}.1.{1}.attn.norm.{2}"),
    (r"block(\d+)\.(\d+)\.mlp\.fc1\.(.+)", "layers.{s}.1.{1}.ffn.layers.0.{2}"),
    (r"block(\d+)\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", "layers.{s}.1.{1}.ffn.layers.1.{2}"),
    (r"block(\d+)\.(\d+)\.mlp\.fc2\.(.+)", "layers.{s}.1.{1}.ffn.layers.4.{2}"),
    (r"norm(\d+)\.(.+)", "layers.{s}.2.{1}"),
]
_MIT_HUGGINGFACE_RULES = [  # transformers' Segformer encoder, stages numbered from 0
    (r"patch_embeddings\.(\d+)\.proj\.(.+)", "layers.{0}.0.projection.{1}"),
    (r"patch_embeddings\.(\d+)\.layer_norm\.(.+)", "layers.{0}.0.norm.{1}"),
    (r"block\.(\d+)\.(\d+)\.layer_norm_([12])\.(.+)", "layers.{0}.1.{1}.norm{2}.{3}"),
    (r"block\.(\d+)\.(\d+)\.attention\.output\.dense\.(.+)", "layers.{0}.1.{1}.attn.attn.out_proj.{2}"),
    (r"block\.(\d+)\.(\d+)\.attention\.self\.sr\.(.+)", "layers.{0}.1.{1}.attn.sr.{2}"),
    (r"block\.(\d+)\.(\d+)\.attention\.self\.layer_norm\.(.+)", "layers.{0}.1.{1}.attn.norm.{2}"),
    (r"block\.(\d+)\.(\d+)\.mlp\.dense1\.(.+)", "layers.{0}.1.{1}.ffn.layers.0.{2}"),
    (r"block\.(\d+)\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", "layers.{0}.1.{1}.ffn.layers.1.{2}"),
    (r"block\.(\d+)\.(\d+)\.mlp\.dense2\.(.+)", "layers.{0}.1.{1}.ffn.layers.4.{2}"),
    (r"layer_norm\.(\d+)\.(.+)", "layers.{0}.2.{1}"),
]
# The attention input projections, concatenated in this order into in_proj_{weight,bias}.
_MIT_SEGFORMER_QKV = (r"block(\d+)\.(\d+)\.attn\.(q|kv)\.(weight|bias)", ("q", "kv"))
_MIT_HUGGINGFACE_QKV = (
    r"block\.(\d+)\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)",
    ("query", "key", "value"),
)


def mit_release_format(state: Mapping[str, torch.Tensor]) -> str:
    """'segformer' (NVlabs release), 'huggingface' (transformers) or 'mmseg' (our names)."""
    if any(re.match(r"(patch_embed|block)\d+\.", k) for k in state):
        return "segformer"
    if any(k.startswith(("segformer.encoder.", "encoder.patch_embeddings.", "patch_embeddings.")) for k in state):
        return "huggingface"
    return "mmseg"


def _renamed(key: str, rules, **extra) -> str | None:
    """`key` renamed by the first (pattern, template) rule that matches it whole, else None; the
    template gets the pattern's groups (and `extra`) as format arguments."""
    for pattern, template in rules:
        found = re.fullmatch(pattern, key)
        if found:
            return template.format(*found.groups(), **{k: f(found.groups()) for k, f in extra.items()})
    return None


def _rename_mit(state: Mapping[str, torch.Tensor], rules, qkv, stage_base: int) -> dict[str, torch.Tensor]:
    qkv_pattern, qkv_order = qkv
    out: dict[str, torch.Tensor] = {}
    # (stage, block, weight|bias) -> {q|kv|query|key|value: (original key, tensor)}
    projections: dict[tuple[str, str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state.items():
        found = re.fullmatch(qkv_pattern, key)
        if found:
            stage, block, which, kind = found.groups()
            projections.setdefault((stage, block, kind), {})[which] = (key, value)
            continue
        new_key = _renamed(key, rules, s=lambda groups: int(groups[0]) - stage_base)
        if new_key is None:
            out[key] = value  # classifier heads etc.: left as they are, reported unused
            continue
        if new_key.endswith(("ffn.layers.0.weight", "ffn.layers.4.weight")) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # Linear -> 1x1 conv
        out[new_key] = value
    for (stage, block, kind), parts in projections.items():
        if set(parts) == set(qkv_order):
            packed = torch.cat([parts[name][1] for name in qkv_order])
            out[f"layers.{int(stage) - stage_base}.1.{block}.attn.attn.in_proj_{kind}"] = packed
        else:  # an incomplete set cannot be packed: keep the originals, so the report lists them
            out.update(dict(parts.values()))
    return out


@register_key_converter("MixVisionTransformer")
def convert_mit(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MiT weights in any of the three namings -> our (MMSegmentation) names."""
    fmt = mit_release_format(state)
    if fmt == "segformer":
        return _rename_mit(state, _MIT_SEGFORMER_RULES, _MIT_SEGFORMER_QKV, stage_base=1)
    if fmt == "huggingface":
        encoder = {}
        for key, value in state.items():
            for prefix in ("segformer.encoder.", "encoder."):
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    break
            encoder[key] = value
        return _rename_mit(encoder, _MIT_HUGGINGFACE_RULES, _MIT_HUGGINGFACE_QKV, stage_base=0)
    return dict(state)


# --- MSCAN --------------------------------------------------------------------------------------


@register_key_converter("MSCAN")
def convert_mscan(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SegNeXt release names -> MMSegmentation's: `blockS.J.mlp.dwconv.dwconv.*` -> `blockS.J.mlp.dwconv.*`.
    Files already in MMSegmentation's names pass unchanged."""
    return {re.sub(r"(^block\d+\.\d+\.mlp\.dwconv)\.dwconv\.", r"\1.", key): value for key, value in state.items()}


# --- Swin ---------------------------------------------------------------------------------------
# Our names (MMSegmentation's) against the Microsoft release (microsoft/Swin-Transformer):
#   patch_embed.projection                     patch_embed.proj
#   stages.i.blocks.j.attn.w_msa.*             layers.i.blocks.j.attn.*   (qkv, proj, bias table)
#   stages.i.blocks.j.ffn.layers.0.0 / .1      layers.i.blocks.j.mlp.fc1 / fc2
#   stages.i.blocks.j.norm1 / norm2            layers.i.blocks.j.norm1 / norm2
#   stages.i.downsample.reduction / .norm      layers.i.downsample.*      (re-ordered, see below)
#   norm0..norm3 (per-stage outputs)           -                          (new)
#   -                                          norm, head                 (unused / dropped)
# In both, stage i's downsample (patch merging) comes after stage i's blocks.

_SWIN_MICROSOFT_RULES = [
    (r"patch_embed\.proj\.(.+)", "patch_embed.projection.{0}"),
    (r"layers\.(\d+)\.blocks\.(\d+)\.attn\.(.+)", "stages.{0}.blocks.{1}.attn.w_msa.{2}"),
    (r"layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(.+)", "stages.{0}.blocks.{1}.ffn.layers.0.0.{2}"),
    (r"layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(.+)", "stages.{0}.blocks.{1}.ffn.layers.1.{2}"),
    (r"layers\.(\d+)\.(.+)", "stages.{0}.{1}"),  # block norms, downsample
]
# The classifier, and the shifted-window masks the release stores for its 224-pixel input (ours are
# built per input size). Its relative-position index tables are kept: for window 7 they equal ours.
_SWIN_MICROSOFT_DROPPED = r"head\..*|.*\.attn_mask"


def swin_release_format(state: Mapping[str, torch.Tensor]) -> str:
    """'microsoft' (the microsoft/Swin-Transformer release) or 'mmseg' (our names)."""
    if any(k.startswith("stages.") for k in state):
        return "mmseg"
    if any(k.startswith("layers.") or ".attn.qkv." in k for k in state):
        return "microsoft"
    return "mmseg"


def swin_merge_order_to_unfold(weight: torch.Tensor) -> torch.Tensor:
    """Re-order the 4C input channels of a patch-merging norm (4C,) or reduction (out, 4C).

    Why: the Microsoft PatchMerging concatenates the four pixels of each 2x2 neighbourhood as
    [x(0,0) | x(1,0) | x(0,1) | x(1,1)] (row, column offsets), C channels each: index k*C + c.
    Ours, like MMSegmentation's, gathers them with nn.Unfold, channel-major over the kernel
    positions in row-major order (0,0), (0,1), (1,0), (1,1): index c*4 + p. Position p of the
    unfold is block [0, 2, 1, 3][p] of the concatenation."""
    *lead, channels = weight.shape
    blocks = weight.reshape(*lead, 4, channels // 4)[..., [0, 2, 1, 3], :]  # (..., p, c)
    return blocks.transpose(-1, -2).reshape(*lead, channels)  # (..., c, p) flattened


def _rename_swin_microsoft(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if re.fullmatch(_SWIN_MICROSOFT_DROPPED, key):
            continue
        key = _renamed(key, _SWIN_MICROSOFT_RULES) or key
        if re.fullmatch(r"stages\.\d+\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", key):
            value = swin_merge_order_to_unfold(value)
        out[key] = value  # the final `norm.*` (and anything unknown) keeps its name: reported unused
    return out


@register_key_converter("SwinTransformer")
def convert_swin(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swin weights from the Microsoft release -> our (MMSegmentation) names; files already in
    MMSegmentation's names pass unchanged."""
    if swin_release_format(state) == "microsoft":
        return _rename_swin_microsoft(state)
    return dict(state)


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"backbone weights from {self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.new)} new (kept at initialisation), {len(self.unused)} in the file unused"
        ]
        if self.new:
            lines.append(f"  new: {', '.join(self.new[:8])}{' ...' if len(self.new) > 8 else ''}")
        if self.unused:
            lines.append(f"  unused: {', '.join(self.unused[:8])}{' ...' if len(self.unused) > 8 else ''}")
        return "\n".join(lines)


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    if any(k.startswith(prefix) for k in state):  # a whole segmentor: keep its backbone part
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def load_backbone_weights(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> LoadReport:
    """Initialise `model.backbone` (or `model`, if it has no backbone) from an ImageNet release."""
    backbone = getattr(model, "backbone", model)
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "state dict"
    state = read_state_dict(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
    state = _strip_prefix(state, "backbone.")
    converter = KEY_CONVERTERS.get(type(backbone).__name__)
    if converter is not None:
        state = converter(state)
    own = backbone.state_dict()
    report = LoadReport(source)
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"{source}: shapes do not fit {type(backbone).__name__}: {', '.join(mismatched[:8])}")
    fitting = {k: v for k, v in state.items() if k in own}
    if not fitting:
        raise CheckpointError(
            f"{source}: no tensor fits {type(backbone).__name__}; is this a checkpoint of that backbone?"
        )
    backbone.load_state_dict(fitting, strict=False)
    report.loaded = sorted(fitting)
    report.new = sorted(set(own) - set(fitting))
    report.unused = sorted(set(state) - set(own))
    if hasattr(backbone, "train"):
        backbone.train(backbone.training)  # refresh anything cached from the weights
    return report
