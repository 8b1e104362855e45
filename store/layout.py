"""The store's fixed names: schema version, array paths, manifest columns, spec identity fields.

Every tensor and file name of a store (`tokens/layer04`, `cls/layer04`, `tokens/layer12_in`,
`text/emp16`, `weights/lastblock.safetensors`) and the bytes a row takes are computed here only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SCHEMA_VERSION = 2  # 2: the manifest records each row's finiteness (column `finite`)
MANIFEST_FILE = "manifest.parquet"
LOCK_FILE = "fsar.lock"
RECIPES = ("emp", "emp+last")
TEXT_DEFAULT = "emp16"  # the class texts fsar-extract writes (EMP-Net's 16 templates)
LASTBLOCK_NAME = "lastblock.safetensors"
LASTBLOCK_FILE = f"weights/{LASTBLOCK_NAME}"
# Keys of `weights/lastblock.safetensors`: the open_clip resblock, then ln_post and proj.
LASTBLOCK_RESBLOCK_KEYS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
LASTBLOCK_KEYS = (*LASTBLOCK_RESBLOCK_KEYS, "ln_post.weight", "ln_post.bias", "proj")
LASTBLOCK_LAYER_SCALE_KEYS = ("ls_1.gamma", "ls_2.gamma")
CHECKSUM_ALGORITHM = "blake2b-128"
STATUSES = ("pending", "ok", "failed")
MAX_ROWS = 10_000_000  # videos a store may list; refused beyond, before allocating anything
ALLOWED_DTYPES = ("float16", "float32")

# Manifest columns besides the per-tensor checksums, in order.
MANIFEST_BASE_COLUMNS = (
    "video_id",
    "relpath",
    "class_name",
    "label",
    "split",
    "row",
    "status",
    "error",
    "n_frames",
    "fps",
    "frame_indices",
    "decoder",
)
MANIFEST_TAIL_COLUMNS = ("finite", "extracted_at")

# Fields that decide whether two stores hold the same features (merge, resume, checkpoints).
SPEC_IDENTITY_FIELDS = (
    "model",
    "pretrained",
    "weights_sha256",
    "image_size",
    "preprocess",
    "frames",
    "views",
    "recipe",
    "layers",
    "tokens",
    "dim",
    "width",
    "dtype",
    "compute.precision",
)


def checksum_column(tensor: str) -> str:
    """Manifest column holding a tensor's per-row checksum: `tokens/layer04` -> `checksum_tokens_layer04`."""
    return "checksum_" + tensor.replace("/", "_")


def default_layers(depth: int) -> list[int]:
    """Cached layers (1-based): 4/8/12 for a 12-layer ViT, thirds of the depth otherwise."""
    if depth < 3:
        raise ValueError(f"a ViT with {depth} blocks is too shallow for the recipe (needs >= 3)")
    return [max(1, round(depth / 3)), max(2, round(2 * depth / 3)), depth]


def token_name(layer: int) -> str:
    """`tokens/layerKK`: every token of layer K (1-based), ln_post and proj applied."""
    return f"tokens/layer{layer:02d}"


def cls_name(layer: int) -> str:
    """`cls/layerKK`: token 0 of `tokens/layerKK`."""
    return f"cls/layer{layer:02d}"


def layer_in_name(layer: int) -> str:
    """`tokens/layerKK_in`: the residual stream entering block K (recipe emp+last)."""
    return f"tokens/layer{layer:02d}_in"


def text_name(name: str = TEXT_DEFAULT) -> str:
    """`text/<name>`: class text embeddings under one template set."""
    return f"text/{name}"


def weights_file(name: str) -> str:
    """`weights/<name>`: a plain file of weights (e.g. the last block)."""
    return f"weights/{name}"


_CLS = re.compile(r"^cls/layer(\d+)$")


def cls_source(name: str) -> str | None:
    """The `tokens/` array a `cls/` array is token 0 of; None for any other name."""
    match = _CLS.match(name)
    return token_name(int(match.group(1))) if match else None


def dimension_names(name: str) -> list[str]:
    """Axis names of a per-row array, as written in its zarr.json."""
    if cls_source(name) is not None:
        return ["video", "view", "frame", "channel"]
    return ["video", "view", "frame", "token", "channel"]


def encoded_names(recipe: str, layers: Sequence[int]) -> list[str]:
    """Per-row arrays the encoder produces for a recipe (`cls/` arrays are derived from them)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: use emp or emp+last")
    names = [token_name(k) for k in layers]
    if recipe == "emp+last":
        names.append(layer_in_name(layers[-1]))
    return names


def row_tensors(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-row arrays a spec implies: name, what it is, dtype and shape without the row axis."""
    v, t, n_tok, d = spec["views"], spec["frames"], spec["tokens"], spec["dim"]
    dtype = spec.get("dtype", "float16")
    out: list[dict[str, Any]] = []
    for layer in spec["layers"]:
        out.append(
            {
                "name": token_name(layer),
                "what": f"output of ViT layer {layer} (1-based), all tokens, ln_post and proj applied",
                "dtype": dtype,
                "shape_per_row": [v, t, n_tok, d],
            }
        )
    for layer in spec["layers"]:
        out.append(
            {
                "name": cls_name(layer),
                "what": f"CLS token of {token_name(layer)}",
                "dtype": dtype,
                "shape_per_row": [v, t, d],
            }
        )
    if spec["recipe"] == "emp+last":
        last = spec["layers"][-1]
        out.append(
            {
                "name": layer_in_name(last),
                "what": f"raw residual stream entering block {last} (before ln_1)",
                "dtype": dtype,
                "shape_per_row": [v, t, n_tok, spec["width"]],
            }
        )
    elif spec["recipe"] not in RECIPES:
        raise ValueError(f"unknown recipe {spec['recipe']!r}: use emp or emp+last")
    keep = spec.get("subset")  # a subset store (fsar-store subset --tensors) keeps only these
    if keep is not None:
        unknown = sorted(set(keep) - {e["name"] for e in out})
        if unknown:
            raise ValueError(f"subset names tensors the spec does not have: {unknown}")
        out = [e for e in out if e["name"] in set(keep)]
    return out


def row_bytes(
    spec: Mapping[str, Any], names: Sequence[str] | None = None, views: int | None = None
) -> int:
    """Uncompressed bytes of one row of the spec's per-row tensors (those in `names`, all by
    default), with all views or `views` of them."""
    total = 0
    for entry in spec["tensors"]:
        if names is None or entry["name"] in names:
            shape = list(entry["shape_per_row"])
            if views is not None:
                shape[0] = views
            total += int(np.prod(shape)) * np.dtype(entry["dtype"]).itemsize
    return total


def manifest_columns(tensors: Sequence[str]) -> list[str]:
    return (
        list(MANIFEST_BASE_COLUMNS)
        + [checksum_column(t) for t in tensors]
        + list(MANIFEST_TAIL_COLUMNS)
    )


def spec_field(spec: Mapping[str, Any], dotted: str) -> Any:
    node: Any = spec
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def spec_differences(
    a: Mapping[str, Any], b: Mapping[str, Any], fields: Sequence[str] = SPEC_IDENTITY_FIELDS
) -> list[str]:
    """Identity fields whose values differ, as `field: a != b` strings (empty when compatible)."""
    diffs = []
    for field in fields:
        va, vb = spec_field(a, field), spec_field(b, field)
        if va != vb:
            diffs.append(f"{field}: {va!r} != {vb!r}")
    return diffs


def build_spec(
    *,
    model: str,
    pretrained: str,
    weights_sha256: str,
    image_size: int,
    preprocess: Mapping[str, Any],
    frames: int,
    views: int,
    recipe: str,
    layers: Sequence[int],
    tokens: int,
    dim: int,
    width: int,
    patch_grid: Sequence[int],
    device: str = "cpu",
    precision: str = "fp32",
    codec: Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A complete spec dict (the `tensors` list is filled in by `create_store`)."""
    spec: dict[str, Any] = {
        "model": model,
        "pretrained": pretrained,
        "weights_sha256": weights_sha256,
        "image_size": int(image_size),
        "preprocess": dict(preprocess),
        "frames": int(frames),
        "views": int(views),
        "recipe": recipe,
        "layers": [int(x) for x in layers],
        "tokens": int(tokens),
        "dim": int(dim),
        "width": int(width),
        "patch_grid": [int(x) for x in patch_grid],
        "dtype": "float16",
        "compute": {"device": device, "precision": precision},
        "versions": dict(versions or {}),
    }
    if codec is not None:
        spec["codec"] = dict(codec)
    spec["tensors"] = row_tensors(spec)
    return spec
