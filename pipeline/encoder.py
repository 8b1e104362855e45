"""The recipe's ViT tensors: `FrameEncoder(clip, recipe)(frames)` -> {"tokens/layer04": (B, L, D), ...}.

One forward captures every component's tensors (`emp+last+ts` costs one pass). `export_last_block`
exports the last block for `weights/lastblock.safetensors` (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from pipeline.errors import EncoderError, UnsupportedModel
from pipeline.model import LoadedClip, default_layers, load_clip
from store.layout import (
    LASTBLOCK_LAYER_SCALE_KEYS,
    LASTBLOCK_RESBLOCK_KEYS,
    check_taps,
    cls_name,
    default_taps,
    encoded_names,
    layer_in_name,
    recipe_parts,
    resid_name,
    token_name,
)

# load_clip is re-exported: `from pipeline.encoder import FrameEncoder, load_clip` builds and runs.
__all__ = ["FrameEncoder", "export_last_block", "load_clip", "tensor_names"]


def tensor_names(
    recipe: str, layers: Sequence[int], taps: Sequence[int] = (), depth: int | None = None
) -> list[str]:
    """Store array names for a recipe (docs/design.md): tokens/layerKK, tokens/layerLL_in,
    resid/layerKK (and cls/layerDD for `ts` without `emp`)."""
    try:
        return encoded_names(recipe, layers, taps, depth)
    except ValueError as error:
        raise EncoderError(str(error)) from None


def _check_visual(visual: nn.Module) -> None:
    if not hasattr(visual, "transformer") or not hasattr(visual.transformer, "resblocks"):
        raise UnsupportedModel(
            f"the vision tower {type(visual).__name__} is not an open_clip VisionTransformer "
            f"(timm/ResNet towers are not supported)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModel("vision towers with attentional pooling are not supported")
    if getattr(visual, "proj", None) is None:
        raise UnsupportedModel("the vision tower has no output projection (proj)")


class FrameEncoder:
    """One forward pass of the frozen visual tower capturing the recipe's tensors.

    Input: preprocessed frames (B, 3, S, S) as a torch tensor or numpy array (any batch composition).
    Output: ``{name: (B, L, D) float16 numpy}`` for ``tokens/layerKK`` (ln_post + proj applied to all
    tokens), with ``last`` ``tokens/layerLL_in`` (B, L, W): the raw residual stream entering the
    last block, with ``ts`` ``resid/layerKK`` (B, L, W) for every tap (0: the ln_pre output, k: block
    k's output, raw) and, without ``emp``, ``cls/layerDD`` (B, D): proj(ln_post(.)) of the last
    block's CLS. CPU runs in fp32; CUDA uses autocast (fp16 by default, or bf16).
    """

    def __init__(
        self,
        clip: LoadedClip | nn.Module,
        recipe: str = "emp",
        layers: Sequence[int] | None = None,
        precision: str = "auto",
        device: str | torch.device | None = None,
        taps: Sequence[int] | None = None,
    ) -> None:
        model = clip.model if isinstance(clip, LoadedClip) else clip
        self.visual: nn.Module = model.visual if hasattr(model, "visual") else model
        _check_visual(self.visual)
        self.depth = len(self.visual.transformer.resblocks)
        self.recipe = recipe
        self.parts = self._parts(recipe)
        self.layers = self._layers(layers) if "emp" in self.parts else []
        self.taps = self._taps(taps) if "ts" in self.parts else []
        self.names = tensor_names(recipe, self.layers, self.taps, self.depth)
        if "last" in self.parts and self.layers[-1] != self.depth:
            raise EncoderError(
                f"recipe {recipe} needs the last cached layer to be the last block ({self.depth}), "
                f"got layers {self.layers}"
            )
        # blocks to run: up to the last layer, the last block's input, and every block with ts
        self.stop = self.depth if "ts" in self.parts else max(self.layers)
        if device is None:
            device = clip.device if isinstance(clip, LoadedClip) else self.visual.proj.device
        self.device = torch.device(device)
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in ("fp32", "fp16", "bf16"):
            raise EncoderError(f"unknown precision '{precision}' (fp32, fp16, bf16 or auto)")
        self.precision = precision
        s = self.visual.image_size
        self.image_size = (int(s[0]), int(s[1])) if not isinstance(s, int) else (s, s)
        self.batch_first = bool(getattr(self.visual.transformer, "batch_first", True))

    @staticmethod
    def _parts(recipe: str) -> frozenset[str]:
        try:
            return recipe_parts(recipe)
        except ValueError as error:
            raise EncoderError(str(error)) from None

    def _layers(self, layers: Sequence[int] | None) -> list[int]:
        chosen = list(layers) if layers is not None else default_layers(self.depth)
        if any(k < 1 or k > self.depth for k in chosen) or sorted(set(chosen)) != chosen:
            raise EncoderError(f"layers {chosen} must be increasing, within 1..{self.depth}")
        return chosen

    def _taps(self, taps: Sequence[int] | None) -> list[int]:
        try:
            return check_taps(default_taps(self.depth) if taps is None else list(taps), self.depth)
        except ValueError as error:
            raise EncoderError(str(error)) from None

    @property
    def compute(self) -> dict[str, str]:
        """The spec's ``compute`` entry."""
        return {"device": self.device.type, "precision": self.precision}

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _to_device(self, frames: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = (
            torch.from_numpy(np.ascontiguousarray(frames))
            if isinstance(frames, np.ndarray)
            else frames
        )
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.image_size:
            raise EncoderError(
                f"frames must be (B, 3, {self.image_size[0]}, {self.image_size[1]}), got {tuple(x.shape)}"
            )
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        return x.float()

    @torch.inference_mode()
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch + class + positional embeddings, patch dropout (identity in eval), ``ln_pre``."""
        v = self.visual
        if hasattr(v, "_embeds"):  # open_clip >= 2.24
            return v._embeds(x)
        x = v.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    @torch.inference_mode()
    def encode_torch(self, frames: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """Like ``__call__`` but returns float32 tensors on the encoder's device (no fp16 rounding).

        Walks the resblocks itself (no hooks), so concurrent calls from several threads are safe.
        """
        x = self._to_device(frames)
        result: dict[str, torch.Tensor] = {}
        with self._autocast():
            h = self._embed(x)
            if not self.batch_first:
                h = h.transpose(0, 1)
            self._capture(result, 0, h)
            for i, block in enumerate(self.visual.transformer.resblocks[: self.stop], start=1):
                if i == self.depth and "last" in self.parts:
                    result[layer_in_name(i)] = self._batch_first(h).float()
                h = block(h)
                self._capture(result, i, h)
        return {name: result[name] for name in self.names}

    def _batch_first(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.batch_first else h.transpose(0, 1)

    def _capture(self, result: dict[str, torch.Tensor], index: int, h: torch.Tensor) -> None:
        """The tensors taken at one point of the residual stream (0: ln_pre output, k: block k)."""
        tokens = self._batch_first(h)
        ln_post, proj = self.visual.ln_post, self.visual.proj
        if index in self.layers:
            result[token_name(index)] = (ln_post(tokens) @ proj).float()
        if index in self.taps:
            result[resid_name(index)] = tokens.float()
        if index == self.depth and cls_name(index) in self.names:
            result[cls_name(index)] = (ln_post(tokens[:, 0]) @ proj).float()

    def __call__(self, frames: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        out = self.encode_torch(frames)
        return {k: v.to(torch.float16).cpu().numpy() for k, v in out.items()}


def export_last_block(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The last visual resblock + ``ln_post`` + ``proj`` as float32 CPU tensors and their config.

    Keys and config follow docs/design.md; ``heads.clip_block.load_last_block`` rebuilds the block in
    plain torch. Refuses blocks with features the plain rebuild does not implement (qk-norm, scaled
    cosine attention, extra norms, tanh GELU).
    """
    visual = model.visual if hasattr(model, "visual") else model
    _check_visual(visual)
    block = visual.transformer.resblocks[-1]
    sd = block.state_dict()
    layer_scale = "ls_1.gamma" in sd
    allowed = set(LASTBLOCK_RESBLOCK_KEYS) | (
        set(LASTBLOCK_LAYER_SCALE_KEYS) if layer_scale else set()
    )
    extra = sorted(set(sd) - allowed)
    missing = sorted(set(allowed) - set(sd))
    if extra or missing:
        raise UnsupportedModel(
            f"the last block of {type(visual).__name__} is not a plain CLIP resblock "
            f"(extra {extra[:3]}, missing {missing[:3]})"
        )
    mha = block.attn
    if isinstance(mha, nn.MultiheadAttention):
        if mha.bias_k is not None or mha.add_zero_attn or not mha._qkv_same_embed_dim:
            raise UnsupportedModel("the last block's attention has bias_k/zero-attn/kdim options")
        heads = int(mha.num_heads)
    else:
        heads = int(getattr(mha, "num_heads", 0))
        for attr in ("ln_q", "ln_k", "ln_inner"):
            if not isinstance(getattr(mha, attr, nn.Identity()), nn.Identity):
                raise UnsupportedModel(f"the last block's attention uses {attr}")
        if (
            getattr(mha, "logit_scale", None) is not None
            or getattr(mha, "head_scale", None) is not None
        ):
            raise UnsupportedModel("the last block uses scaled-cosine or head-scaled attention")
    act_mod = block.mlp.gelu
    if isinstance(act_mod, QuickGELU):
        act = "quick_gelu"
    elif isinstance(act_mod, nn.GELU) and act_mod.approximate == "none":
        act = "gelu"
    else:
        raise UnsupportedModel(f"the last block's activation {act_mod!r} is not gelu or quick_gelu")
    eps = {float(block.ln_1.eps), float(block.ln_2.eps), float(visual.ln_post.eps)}
    if len(eps) != 1:
        raise UnsupportedModel(f"the last block's LayerNorms use different eps {sorted(eps)}")
    width = int(block.ln_1.weight.shape[0])
    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in sd.items()}
    tensors["ln_post.weight"] = visual.ln_post.weight.detach().float().cpu().contiguous().clone()
    tensors["ln_post.bias"] = visual.ln_post.bias.detach().float().cpu().contiguous().clone()
    tensors["proj"] = visual.proj.detach().float().cpu().contiguous().clone()
    config = {
        "width": width,
        "heads": heads,
        "mlp_ratio": float(block.mlp.c_fc.weight.shape[0]) / width,
        "act": act,
        "ln_eps": eps.pop(),
        "layer_scale": layer_scale,
        "dim": int(visual.proj.shape[1]),
    }
    return tensors, config
