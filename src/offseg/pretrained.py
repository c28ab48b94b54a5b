"""ImageNet initialisation of backbones from their usual release files.

Weights are handled here, apart from the model code. `load_backbone_weights(model, path)` reads the
file without executing pickled code, converts its key names to the backbone's when the release
uses other names, loads what fits and reports what was loaded, what stays at its initial value
(new) and what the file had that the backbone does not use (classification heads).

Release formats per backbone class:
- EfficientFormerV2: the snap-research release, {'model': {'patch_embed.*', 'network.*', 'norm.*',
  'head.*', 'dist_head.*'}}, where names already match, and timm's (`stem.conv1.conv`,
  `stages.N.blocks.M.mlp.fc1.conv`, `token_mixer.q.bn`, `ls1.gamma`, ...; see
  `convert_efficientformer_v2`). In both, the 224-pixel `attention_biases` tables land in the unused
  legacy buffers and the `attention_biases_seg` tables start at zero, as in the official
  fine-tuning. The classifier (norm, head, dist_head / head_dist) is reported unused.
- MixVisionTransformer (MiT-B0..B5), four namings (see `convert_mit`):
  the SegFormer release (NVlabs: `patch_embed1.proj`, `block1.0.attn.q` / `attn.kv`, `norm1`, `head`),
  MMSegmentation's converted files (our names already), Hugging Face `transformers` 4.x
  (`segformer.encoder.patch_embeddings.0.proj`, `block.0.0.attention.self.query` / `key` / `value`,
  `layer_norm.0`, `classifier`) and transformers 5 (`segformer.stages.0.patch_embeddings.proj`,
  `stages.0.blocks.0.layernorm_before`, `attention.q_proj` / `k_proj` / `v_proj` / `o_proj`,
  `attention.sequence_reduction.*`, `mlp.fc1`, `stages.0.layer_norm`).
- MSCAN (SegNeXt): the SegNeXt release (Visual-Attention-Network) names the depthwise conv of the
  MLP `mlp.dwconv.dwconv`, MMSegmentation `mlp.dwconv`; everything else already matches. Its
  classifier (`head.*`) is reported unused.
- SwinTransformer: the Microsoft release ({'model': {'patch_embed.proj', 'layers.*', 'norm.*',
  'head.*'}}, see `convert_swin`), timm's (timm >= 0.9: the same names, but each patch merging
  belongs to the stage after it, `layers.N.downsample`, and the head is `head.fc`) and
  MMSegmentation's converted files (our names already). The patch-merging weights are re-ordered to
  our `nn.Unfold` layout; the classifier head and the attention-mask buffers are dropped, the final
  `norm` is reported unused, and the per-stage output norms `norm0`..`norm3` are new.
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
_MIT_TRANSFORMERS5_RULES = [  # transformers >= 5 (its SegformerModel rename table), stages from 0
    (r"stages\.(\d+)\.patch_embeddings\.proj\.(.+)", "layers.{0}.0.projection.{1}"),
    (r"stages\.(\d+)\.patch_embeddings\.layer_norm\.(.+)", "layers.{0}.0.norm.{1}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.layernorm_before\.(.+)", "layers.{0}.1.{1}.norm1.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.layernorm_after\.(.+)", "layers.{0}.1.{1}.norm2.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attention\.o_proj\.(.+)", "layers.{0}.1.{1}.attn.attn.out_proj.{2}"),
    (
        r"stages\.(\d+)\.blocks\.(\d+)\.attention\.sequence_reduction\.sequence_reduction\.(.+)",
        "layers.{0}.1.{1}.attn.sr.{2}",
    ),
    (
        r"stages\.(\d+)\.blocks\.(\d+)\.attention\.sequence_reduction\.layer_norm\.(.+)",
        "layers.{0}.1.{1}.attn.norm.{2}",
    ),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(.+)", "layers.{0}.1.{1}.ffn.layers.0.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", "layers.{0}.1.{1}.ffn.layers.1.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(.+)", "layers.{0}.1.{1}.ffn.layers.4.{2}"),
    (r"stages\.(\d+)\.layer_norm\.(.+)", "layers.{0}.2.{1}"),
]
# The attention input projections, concatenated in this order into in_proj_{weight,bias}.
_MIT_SEGFORMER_QKV = (r"block(\d+)\.(\d+)\.attn\.(q|kv)\.(weight|bias)", ("q", "kv"))
_MIT_HUGGINGFACE_QKV = (
    r"block\.(\d+)\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)",
    ("query", "key", "value"),
)
_MIT_TRANSFORMERS5_QKV = (
    r"stages\.(\d+)\.blocks\.(\d+)\.attention\.(q_proj|k_proj|v_proj)\.(weight|bias)",
    ("q_proj", "k_proj", "v_proj"),
)


def mit_release_format(state: Mapping[str, torch.Tensor]) -> str:
    """'segformer' (NVlabs release), 'huggingface' (transformers 4.x), 'transformers5' or 'mmseg'
    (our names)."""
    if any(re.match(r"(patch_embed|block)\d+\.", k) for k in state):
        return "segformer"
    if any(k.startswith(("segformer.encoder.", "encoder.patch_embeddings.", "patch_embeddings.")) for k in state):
        return "huggingface"
    if any(re.match(r"(segformer\.)?stages\.\d+\.patch_embeddings\.", k) for k in state):
        return "transformers5"
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
    """MiT weights in any of the four namings -> our (MMSegmentation) names."""
    fmt = mit_release_format(state)
    if fmt == "segformer":
        return _rename_mit(state, _MIT_SEGFORMER_RULES, _MIT_SEGFORMER_QKV, stage_base=1)
    if fmt == "transformers5":
        encoder = {k.removeprefix("segformer."): v for k, v in state.items()}
        return _rename_mit(encoder, _MIT_TRANSFORMERS5_RULES, _MIT_TRANSFORMERS5_QKV, stage_base=0)
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


# --- EfficientFormerV2 ----------------------------------------------------------------------------
# Our names (the official ones) against timm's `efficientformerv2_*` (timm's ConvNorm is a module
# with `conv` and `bn`, ours a Sequential of the two; its LayerScale2d holds a (C,) `gamma`):
#   patch_embed.0 / .1, patch_embed.3 / .4       stem.conv1.conv / .bn, stem.conv2.conv / .bn
#   network.{2i}.j.*                             stages.i.blocks.j.*
#   network.{2i-1}.proj / .norm                  stages.i.downsample.conv.conv / .bn      (i = 1, 2)
#   network.{2i-1}.conv / .bn, .attn.*           stages.i.downsample.conv.*, .attn.*      (i = 3)
#   mlp.fc1 / norm1, mid / mid_norm, fc2 / norm2 mlp.fc1.conv / .bn, mid.conv / .bn, fc2.conv / .bn
#   layer_scale_1 / layer_scale_2 (C, 1, 1)      ls1.gamma / ls2.gamma (C,)
#   attention {q, k, v, v_local, stride_conv}.0 / .1            {q, k, v, v_local, stride_conv}.conv / .bn
#   attention proj.1 / proj.2 (after a GELU)                    proj.conv / proj.bn
#   downsampling attention q.local.0, q.proj.0 / .1             q.local, q.proj.conv / .bn
#   attention_biases (the legacy 224-pixel table)               attention_biases
#   -                                                           norm, head, head_dist (unused)

_EFFICIENTFORMER_V2_TIMM_RULES = [
    (r"stem\.conv1\.conv\.(.+)", "patch_embed.0.{0}"),
    (r"stem\.conv1\.bn\.(.+)", "patch_embed.1.{0}"),
    (r"stem\.conv2\.conv\.(.+)", "patch_embed.3.{0}"),
    (r"stem\.conv2\.bn\.(.+)", "patch_embed.4.{0}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.ls([12])\.gamma", "network.{b}.{1}.layer_scale_{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.(fc1|fc2|mid)\.conv\.(.+)", "network.{b}.{1}.mlp.{2}.{3}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.bn\.(.+)", "network.{b}.{1}.mlp.norm1.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.mid\.bn\.(.+)", "network.{b}.{1}.mlp.mid_norm.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.bn\.(.+)", "network.{b}.{1}.mlp.norm2.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.token_mixer\.(.+)", "network.{b}.{1}.token_mixer.{2}"),
    (r"stages\.(\d+)\.downsample\.attn\.(.+)", "network.{d}.attn.{1}"),
    (r"stages\.(\d+)\.downsample\.conv\.conv\.(.+)", "network.{d}.{c}.{1}"),
    (r"stages\.(\d+)\.downsample\.conv\.bn\.(.+)", "network.{d}.{n}.{1}"),
]
# Inside an attention (after the rules above): timm's ConvNorm parts -> Sequential indices.
_EFFICIENTFORMER_V2_TIMM_ATTENTION = [
    (r"(.+\.(?:token_mixer|attn))\.(q|k|v|v_local|stride_conv|q\.proj)\.conv\.(.+)", "{0}.{1}.0.{2}"),
    (r"(.+\.(?:token_mixer|attn))\.(q|k|v|v_local|stride_conv|q\.proj)\.bn\.(.+)", "{0}.{1}.1.{2}"),
    (r"(.+\.(?:token_mixer|attn))\.proj\.conv\.(.+)", "{0}.proj.1.{1}"),
    (r"(.+\.(?:token_mixer|attn))\.proj\.bn\.(.+)", "{0}.proj.2.{1}"),
    (r"(.+\.attn)\.q\.local\.(.+)", "{0}.q.local.0.{1}"),
]


def efficientformer_v2_release_format(state: Mapping[str, torch.Tensor]) -> str:
    """'timm' (timm's efficientformerv2_*) or 'official' (snap-research release, our names)."""
    if any(k.startswith(("stem.conv1.", "stages.")) for k in state):
        return "timm"
    return "official"


@register_key_converter("EfficientFormerV2")
def convert_efficientformer_v2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientFormerV2 weights in timm's names -> ours; the official release passes unchanged."""
    if efficientformer_v2_release_format(state) != "timm":
        return dict(state)
    attention_downsample = {int(m.group(1)) for k in state if (m := re.match(r"stages\.(\d+)\.downsample\.attn\.", k))}

    def stage(groups) -> int:
        return int(groups[0]) if groups and groups[0].isdigit() else -1  # -1: a stem rule, unused

    extra = {
        "b": lambda g: 2 * stage(g),  # stage i's blocks
        "d": lambda g: 2 * stage(g) - 1,  # the downsampling into stage i
        "c": lambda g: "conv" if stage(g) in attention_downsample else "proj",
        "n": lambda g: "bn" if stage(g) in attention_downsample else "norm",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = _renamed(key, _EFFICIENTFORMER_V2_TIMM_RULES, **extra)
        if new_key is None:
            out[key] = value  # classifier (norm, head, head_dist): reported unused
            continue
        new_key = _renamed(new_key, _EFFICIENTFORMER_V2_TIMM_ATTENTION) or new_key
        if re.search(r"\.layer_scale_[12]$", new_key) and value.ndim == 1:
            value = value.reshape(-1, 1, 1)
        out[new_key] = value
    return out


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
    """'microsoft' (the microsoft/Swin-Transformer release, and timm before 0.9), 'timm' (timm >= 0.9)
    or 'mmseg' (our names)."""
    if any(k.startswith("stages.") for k in state):
        return "mmseg"
    if any(k.startswith("layers.") or ".attn.qkv." in k for k in state):
        merges = {int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.downsample\.", k))}
        # timm >= 0.9 puts each patch merging at the start of the next stage: none in layers.0
        if "head.fc.weight" in state or (merges and 0 not in merges):
            return "timm"
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


def _swin_timm_to_microsoft(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # timm >= 0.9: `layers.N.downsample` merges the output of stage N - 1, and the head is
    # `head.fc`; the 2x2 concatenation order inside the merging is the Microsoft one.
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        out[re.sub(r"^head\.fc\.", "head.", key)] = value
    return out


@register_key_converter("SwinTransformer")
def convert_swin(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swin weights from the Microsoft release or timm -> our (MMSegmentation) names; files
    already in MMSegmentation's names pass unchanged."""
    fmt = swin_release_format(state)
    if fmt == "timm":
        return _rename_swin_microsoft(_swin_timm_to_microsoft(state))
    if fmt == "microsoft":
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
