"""TS-FSAR's side network and CLS adapter, as the released `trainers/model.py` builds them, on cached taps.

Tap i (the `ln_pre` output for tap 0, the raw residual stream after CLIP block k for tap k) goes
through its own LayerNorm and bias-free Linear (width -> side width). Side block j reads the first
tap's projection (j = 0) or the previous mix, and its output is mixed with the projection of tap
j + 1 by a learnable gate: `g * side + (1 - g) * tap`, `g = sigmoid(gate / gate_t)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Released LSN.TEMP_LAYERS [6, 8, 10]: 0-based side blocks of a 12-block ViT, i.e. the side blocks
# mixed with the outputs of CLIP blocks 7, 9 and 11.
RELEASED_TEMPORAL_BLOCKS = (7, 9, 11)
RELEASED_DEPTH = 12


class Attention(nn.Module):
    """Released `Attention`: separate q, k, v Linears, softmax(q k^T / sqrt(d)) v, output Linear."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not a multiple of its {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over the second-to-last axis of x (B, N, C)."""
        b, n, c = x.shape
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight])  # one product, not three
        bias = None if self.q.bias is None else torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(x, weight, bias).view(b, n, 3, self.heads, c // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """Linear, exact GELU, Linear (the released dropout rates are 0)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SideBlock(nn.Module):
    """Released `ViTBlock`: pre-norm attention and MLP; `temporal` attends over frames per token."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """x (B*T, N, C), frames of a video consecutive -> (B*T, N, C)."""
        if self.temporal:
            bt, n, c = x.shape
            seq = x.view(bt // frames, frames, n, c).transpose(1, 2).reshape(-1, frames, c)
            seq = seq + self.attn(self.norm1(seq))
            x = seq.view(bt // frames, n, frames, c).transpose(1, 2).reshape(bt, n, c)
        else:
            x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Adapter(nn.Module):
    """Released `Adapter` on the frozen projected CLS of each frame: attention over a video's frames,
    8 heads with biases, mixed as `(2 - res_alpha) * x + res_alpha * attn(norm(x))`."""

    def __init__(self, dim: int, res_alpha: float, heads: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.res_alpha = res_alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        return (2.0 - self.res_alpha) * x + self.res_alpha * self.attn(self.norm1(x))


def temporal_side_blocks(
    taps: Sequence[int], depth: int, temporal_blocks: Sequence[int] | None = None
) -> list[bool]:
    """Which side blocks attend over time: block j (between taps[j] and taps[j + 1]) is temporal when
    a CLIP block b with taps[j] < b <= taps[j + 1] is one of `temporal_blocks` (1-based CLIP block
    numbers). Default: the released 7, 9, 11 of 12, at the same fractions of another `depth`
    (rounded). With every tap cached this is exactly the released TEMP_LAYERS rule."""
    if temporal_blocks is None:
        temporal_blocks = [round(b * depth / RELEASED_DEPTH) for b in RELEASED_TEMPORAL_BLOCKS]
    chosen = set(int(b) for b in temporal_blocks)
    return [any(lo < b <= hi for b in chosen) for lo, hi in zip(taps[:-1], taps[1:], strict=True)]


class SideNetwork(nn.Module):
    """One LayerNorm + down-projection per tap, one side block and one gate per tap after the first."""

    def __init__(
        self,
        width: int,
        side_width: int,
        temporal: Sequence[bool],
        heads: int,
        mlp_ratio: float = 4.0,
        gate_t: float = 0.1,
        gate_init: float = 0.0,
    ) -> None:
        super().__init__()
        n_taps = len(temporal) + 1
        self.tap_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(n_taps))
        self.tap_downs = nn.ModuleList(
            nn.Linear(width, side_width, bias=False) for _ in range(n_taps)
        )
        self.blocks = nn.ModuleList(SideBlock(side_width, heads, mlp_ratio, t) for t in temporal)
        self.gates = nn.ParameterList(
            nn.Parameter(torch.full((1,), float(gate_init))) for _ in temporal
        )
        self.gate_t = gate_t

    def forward(self, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        """taps: one (B, T, N, W) tensor per tap (any float dtype) -> (B, T, N, side width)."""
        b, t, n = taps[0].shape[:3]

        def down(i: int) -> torch.Tensor:  # each tap converted to float32 only when it is used
            return self.tap_downs[i](self.tap_norms[i](taps[i].flatten(0, 1).float()))

        hidden = down(0)
        for j, block in enumerate(self.blocks):
            side = block(hidden, t)
            gate = torch.sigmoid(self.gates[j] / self.gate_t)
            hidden = gate * side + (1 - gate) * down(j + 1)
        return hidden.view(b, t, n, -1)


# ------------------------------------------------------------------ initialisation from the store

BLOCK_INIT_KEYS = (
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
    "attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias",
    "attn.v.weight", "attn.v.bias", "attn.proj.weight", "attn.proj.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
)  # fmt: skip
ADAPTER_INIT_KEYS = tuple(k for k in BLOCK_INIT_KEYS if k.startswith("attn."))


class InitError(ValueError):
    """A side-network initialisation file that does not fit the head (one-line message)."""


def init_assignments(
    tensors: Mapping[str, torch.Tensor], taps: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The head's parameter names -> initial values: side block j from CLIP block taps[j + 1]'s entry
    (`blockKK.*`), the adapter's attention from `adapter.attn.*` (keys of TS_INTERFACE.md)."""
    out: dict[str, torch.Tensor] = {}
    for j, clip_block in enumerate(taps[1:]):
        for key in BLOCK_INIT_KEYS:
            source = f"block{clip_block:02d}.{key}"
            if source not in tensors:
                raise InitError(f"the side-network initialisation has no {source}")
            out[f"side.blocks.{j}.{key}"] = tensors[source]
    for key in ADAPTER_INIT_KEYS:
        source = f"adapter.{key}"
        if source not in tensors:
            raise InitError(f"the side-network initialisation has no {source}")
        out[f"adapter.{key}"] = tensors[source]
    return out


def load_init(module: nn.Module, assignments: Mapping[str, torch.Tensor]) -> None:
    """Copy `assignments` into `module`'s parameters, refusing any name or shape that does not fit."""
    params = dict(module.named_parameters())
    for name, value in assignments.items():
        if name not in params:
            raise InitError(f"the side-network initialisation sets {name}, which the head lacks")
        if tuple(params[name].shape) != tuple(value.shape):
            raise InitError(
                f"the side-network initialisation gives {name} shape {tuple(value.shape)}, "
                f"the head has {tuple(params[name].shape)}"
            )
    with torch.no_grad():
        for name, value in assignments.items():
            params[name].copy_(torch.as_tensor(value, dtype=params[name].dtype))
