"""The last CLIP ViT block + ``ln_post`` + ``proj``, rebuilt in plain torch from the store's tensors.

Stage 1 exports the block (``pipeline.encoder.export_last_block``) into ``weights/lastblock.safetensors``
with open_clip's resblock key names and a config (docs/design.md). This module never imports open_clip:
``load_last_block(tensors, config)`` returns a :class:`LastBlock` whose parameters are trainable
``nn.Parameter``s, applied to the cached ``tokens/layerLL_in`` residual stream (B, L, W):

    block = load_last_block(tensors, config)
    tokens = block(x_in)                  # (B, L, D): equals the cached tokens/layerLL (fp16 tolerance)
    cls = block(x_in, cls_only=True)      # (B, D): only the CLS query is attended (what `lastlayer` needs)

Attention follows ``nn.MultiheadAttention`` (packed in-projection, scale 1/sqrt(head_dim), no dropout).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LastBlock", "load_last_block", "validate_config", "CONFIG_KEYS"]

CONFIG_KEYS = ("width", "heads", "mlp_ratio", "act", "ln_eps", "layer_scale", "dim")
MAX_WIDTH = 8192  # of a block's width and output dim (CLIP's largest, ViT-bigG, is 1664 wide)
MAX_MLP_RATIO = 16.0


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check and normalise a last-block config (types, ranges); raises ValueError with one line."""
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"last-block config lacks {', '.join(missing)}")
    cfg = {
        "width": int(config["width"]),
        "heads": int(config["heads"]),
        "mlp_ratio": float(config["mlp_ratio"]),
        "act": str(config["act"]),
        "ln_eps": float(config["ln_eps"]),
        "layer_scale": bool(config["layer_scale"]),
        "dim": int(config["dim"]),
    }
    if cfg["act"] not in ("gelu", "quick_gelu"):
        raise ValueError(f"last-block act must be gelu or quick_gelu, got {cfg['act']!r}")
    if cfg["width"] <= 0 or cfg["heads"] <= 0 or cfg["width"] % cfg["heads"]:
        raise ValueError(
            f"last-block width {cfg['width']} is not divisible by heads {cfg['heads']}"
        )
    if cfg["dim"] <= 0 or cfg["mlp_ratio"] <= 0 or cfg["ln_eps"] <= 0:
        raise ValueError("last-block dim, mlp_ratio and ln_eps must be positive")
    if max(cfg["width"], cfg["dim"]) > MAX_WIDTH or cfg["mlp_ratio"] > MAX_MLP_RATIO:
        raise ValueError(
            f"last-block width {cfg['width']}, dim {cfg['dim']} or mlp_ratio {cfg['mlp_ratio']} is "
            f"beyond any CLIP's (at most {MAX_WIDTH}, {MAX_WIDTH} and {MAX_MLP_RATIO:g})"
        )
    return cfg


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, H, L, W/H)
        b, n, w = t.shape
        return t.reshape(b, n, self.heads, w // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """x: normalised tokens (B, L, W) -> (B, L, W), or (B, 1, W) for the CLS query only."""
        w = x.shape[-1]
        if cls_only:
            q = F.linear(x[:, :1], self.in_proj_weight[:w], self.in_proj_bias[:w])
            k, v = F.linear(x, self.in_proj_weight[w:], self.in_proj_bias[w:]).chunk(2, dim=-1)
        else:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        attn = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
        out = attn.softmax(dim=-1) @ v  # (B, H, Lq, hd)
        out = out.transpose(1, 2).reshape(x.shape[0], q.shape[2], w)
        return self.out_proj(out)


class LastBlock(nn.Module):
    """Pre-norm CLIP resblock followed by ``ln_post`` and the output projection ``proj`` (W x D)."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        ln_eps: float = 1e-5,
        layer_scale: bool = False,
        dim: int = 512,
    ) -> None:
        super().__init__()
        self.config = validate_config(
            {
                "width": width,
                "heads": heads,
                "mlp_ratio": mlp_ratio,
                "act": act,
                "ln_eps": ln_eps,
                "layer_scale": layer_scale,
                "dim": dim,
            }
        )
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = SelfAttention(width, heads)
        self.ls_1 = LayerScale(width) if layer_scale else nn.Identity()
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )
        self.ls_2 = LayerScale(width) if layer_scale else nn.Identity()
        self.ln_post = nn.LayerNorm(width, eps=ln_eps)
        self.proj = nn.Parameter(torch.randn(width, dim) * width**-0.5)

    @classmethod
    def from_state(
        cls, tensors: Mapping[str, torch.Tensor | np.ndarray], config: Mapping[str, Any]
    ) -> LastBlock:
        """Build from exported tensors + config; every key must be present with the right shape,
        checked against a block on the meta device before the real one is allocated (a config that
        claims a huge block beside small tensors is refused without building it)."""
        cfg = validate_config(config)
        with torch.device("meta"):
            own = cls(**cfg).state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise ValueError(
                f"last-block tensors do not match the config: missing {missing}, extra {extra}"
            )
        state = {}
        for k, v in tensors.items():
            t = torch.from_numpy(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
            if tuple(t.shape) != tuple(own[k].shape):
                raise ValueError(
                    f"last-block tensor {k} has shape {list(t.shape)}, expected {list(own[k].shape)}"
                )
            state[k] = t.to(torch.float32)
        block = cls(**cfg)
        block.load_state_dict(state, strict=True)
        return block

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Detached float32 CPU copies of the parameters under the store's key names."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}

    def forward_block(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream after the block (B, L, W), before ``ln_post``."""
        x = x + self.ls_1(self.attn(self.ln_1(x)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))

    def forward(self, x_in: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """x_in: residual stream entering the block (B, L, W), any float dtype (cast to the weights').

        Returns projected tokens (B, L, D), or the projected CLS (B, D) when ``cls_only``; the CLS path
        attends with the CLS query alone and runs the MLP on one token, so it costs about 1/L of the full
        block beyond the shared LayerNorm and key/value projections.
        """
        x = x_in.to(self.proj.dtype)
        if cls_only:
            cls = x[:, :1] + self.ls_1(self.attn(self.ln_1(x), cls_only=True))
            cls = cls + self.ls_2(self.mlp(self.ln_2(cls)))
            return self.ln_post(cls[:, 0]) @ self.proj
        return self.ln_post(self.forward_block(x)) @ self.proj


def load_last_block(
    tensors: Mapping[str, torch.Tensor | np.ndarray], config: Mapping[str, Any]
) -> LastBlock:
    """``LastBlock.from_state``: the rebuilt block with trainable parameters (float32, CPU)."""
    return LastBlock.from_state(tensors, config)
