"""The store's fixed names: schema version, recipes, array paths, manifest columns, identity fields.

Every tensor and file name of a store (`tokens/layer04`, `cls/layer04`, `tokens/layer12_in`,
`resid/layer07`, `text/emp16`, `weights/lastblock.safetensors`, `weights/tsfsar_init.safetensors`)
and the bytes a row takes are computed here only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Schema 2 adds recipes with `ts` (resid/ arrays, spec fields `taps` and `depth`). A store is written
# with the lowest schema that describes it (`schema_version_for`): emp and emp+last stores stay 1, so
# an older fsar still reads them, and says "upgrade fsar" for a ts store instead of calling it damaged.
SCHEMA_VERSION = 2  # the highest schema this fsar reads
MANIFEST_FILE = "manifest.parquet"
LOCK_FILE = "fsar.lock"
# A recipe is '+'-joined components: emp (tokens/ + cls/ of `layers`), last (the last block's input
# and weights, for the lastlayer head), ts (the raw residual stream at `taps`, for the tsfsar head).
RECIPE_COMPONENTS = ("emp", "last", "ts")
RECIPES = ("emp", "emp+last", "ts", "emp+ts", "emp+last+ts")
TEXT_DEFAULT = "emp16"  # the class texts fsar-extract writes (EMP-Net's 16 templates)
# `fsar-extract --class-descriptions FILE`: one embedding per class (the mean over its sentences, as
# TS-FSAR's build_embeddings), stored as text/descriptions (C, 1, D) with one describing "template".
TEXT_DESCRIPTIONS = "descriptions"
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
# TS-FSAR's side-network initialisation (PCA of CLIP's block weights, computed at extraction).
TSFSAR_INIT_NAME = "tsfsar_init.safetensors"
TSFSAR_INIT_FILE = f"weights/{TSFSAR_INIT_NAME}"
TSFSAR_SIDE_WIDTH = 256  # the released LSN.EMBED_DIM for ViT-B/16 (width 768)
TSFSAR_MLP_RATIO = 4.0  # the released LSN.MLP_RATIO
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
# Identity fields only some recipes have (compared when either spec has them; absent in emp stores).
RECIPE_IDENTITY_FIELDS = ("taps",)
MAX_TAPS = 256  # a spec's taps list is bounded before anything is allocated from it


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


def resid_name(tap: int) -> str:
    """`resid/layerKK`: the raw residual stream at tap K (0 = ln_pre output, K = block K's output)."""
    return f"resid/layer{tap:02d}"


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


def recipe_parts(recipe: str) -> frozenset[str]:
    """The components of a recipe (`emp+ts` -> {emp, ts}); ValueError for a recipe fsar does not know."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    return frozenset(recipe.split("+"))


def schema_version_for(spec: Mapping[str, Any]) -> int:
    """The lowest schema describing a store of this spec (1 without `ts`, 2 with it)."""
    return 2 if "ts" in recipe_parts(spec["recipe"]) else 1


def default_taps(depth: int) -> list[int]:
    """Every tap: 0 (the ln_pre output) and the output of each of the `depth` blocks."""
    return list(range(depth + 1))


def evenly_spaced_taps(depth: int, blocks: int) -> list[int]:
    """Taps for a side network of `blocks` blocks: 0, then `blocks` block outputs evenly spaced
    up to the last (12 blocks, 3 -> [0, 4, 8, 12]; the paper's side-depth ablation)."""
    if not 1 <= blocks <= depth:
        raise ValueError(f"a side network of {blocks} blocks does not fit a {depth}-block ViT")
    return sorted({round(i * depth / blocks) for i in range(blocks + 1)})


def check_taps(taps: Sequence[int], depth: int) -> list[int]:
    """Taps as a list of ints, or ValueError unless strictly increasing within 0..depth (>= 2 taps:
    the tap before the first side block and at least one after)."""
    if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= MAX_TAPS:
        raise ValueError(f"depth {depth!r} must be an int in 1..{MAX_TAPS}")
    if not isinstance(taps, Sequence) or isinstance(taps, str) or len(taps) > MAX_TAPS:
        raise ValueError(f"taps {taps!r} must be a list of ints")
    out = [int(t) for t in taps if isinstance(t, int) and not isinstance(t, bool)]
    if len(out) != len(taps) or len(out) < 2:
        raise ValueError(f"taps {list(taps)!r}: give at least two ints (e.g. 0,{depth})")
    if out != sorted(set(out)) or out[0] < 0 or out[-1] > depth:
        raise ValueError(f"taps {out}: use increasing ints within 0..{depth} (0 = ln_pre output)")
    return out


def spec_taps(spec: Mapping[str, Any]) -> list[int]:
    """The `ts` taps of a spec (empty without `ts`); ValueError when they are malformed."""
    if "ts" not in recipe_parts(spec["recipe"]):
        if spec.get("taps") is not None:
            raise ValueError(f"recipe {spec['recipe']} has no ts component but the spec lists taps")
        return []
    return check_taps(spec.get("taps"), spec.get("depth"))  # type: ignore[arg-type]


def encoded_names(
    recipe: str, layers: Sequence[int], taps: Sequence[int] = (), depth: int | None = None
) -> list[str]:
    """Per-row arrays the encoder produces for a recipe, in order (`cls/` arrays of `tokens/`
    arrays are derived from them by the writer; a `ts` store without `emp` gets cls/ directly)."""
    parts = recipe_parts(recipe)
    names = [token_name(k) for k in layers] if "emp" in parts else []
    if "last" in parts:
        names.append(layer_in_name(layers[-1]))
    if "ts" in parts:
        if depth is None:
            raise ValueError("recipe ts needs the ViT's depth")
        names += [resid_name(k) for k in taps]
        if token_name(depth) not in names:
            names.append(cls_name(depth))
    return names


def _entry(name: str, what: str, dtype: str, shape: Sequence[int]) -> dict[str, Any]:
    return {"name": name, "what": what, "dtype": dtype, "shape_per_row": [int(x) for x in shape]}


def row_tensors(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-row arrays a spec implies: name, what it is, dtype and shape without the row axis."""
    v, t, n_tok, d = spec["views"], spec["frames"], spec["tokens"], spec["dim"]
    dtype = spec.get("dtype", "float16")
    parts = recipe_parts(spec["recipe"])
    taps = spec_taps(spec)
    layers = list(spec["layers"]) if "emp" in parts else []
    if "emp" not in parts and spec["layers"]:
        raise ValueError(
            f"recipe {spec['recipe']} caches no tokens/ layers but the spec lists some"
        )
    out = [
        _entry(
            token_name(k),
            f"output of ViT layer {k} (1-based), all tokens, ln_post and proj applied",
            dtype,
            [v, t, n_tok, d],
        )
        for k in layers
    ]
    out += [_entry(cls_name(k), f"CLS token of {token_name(k)}", dtype, [v, t, d]) for k in layers]
    if "last" in parts:
        last = layers[-1]
        out.append(
            _entry(
                layer_in_name(last),
                f"raw residual stream entering block {last} (before ln_1)",
                dtype,
                [v, t, n_tok, spec["width"]],
            )
        )
    for k in taps:
        where = "ln_pre output (input of block 1)" if k == 0 else f"output of block {k}"
        out.append(
            _entry(
                resid_name(k),
                f"raw residual stream, {where}: all tokens, before ln_post, not projected",
                dtype,
                [v, t, n_tok, spec["width"]],
            )
        )
    depth = spec.get("depth")
    if taps and cls_name(depth) not in {e["name"] for e in out}:
        out.append(
            _entry(
                cls_name(depth), f"proj(ln_post(CLS)) of block {depth}'s output", dtype, [v, t, d]
            )
        )
    keep = spec.get("subset")  # a subset store (fsar-store subset --tensors) keeps only these
    if keep is not None:
        unknown = sorted(set(keep) - {e["name"] for e in out})
        if unknown:
            raise ValueError(f"subset names tensors the spec does not have: {unknown}")
        out = [e for e in out if e["name"] in set(keep)]
    return out


def written_tensors(spec: Mapping[str, Any]) -> list[str]:
    """Per-row arrays a writer must supply: all but the `cls/` arrays derived from a `tokens/` array
    of the same spec."""
    names = [e["name"] for e in spec["tensors"]]
    return [n for n in names if cls_source(n) not in names]


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


def recipe_sizes(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Uncompressed bytes per video of every recipe (ts with all taps and with 6- and 3-block side
    networks) at this spec's model, frames and views: what `fsar-store info` prints."""
    depth = int(spec.get("depth") or max(spec["layers"]))
    layers = list(spec["layers"]) or default_layers(depth)
    choices = [default_taps(depth)] + [
        evenly_spaced_taps(depth, b)
        for b in sorted({max(1, depth // 2), max(1, depth // 4)}, reverse=True)
    ]
    out = []
    for recipe in RECIPES:
        tap_sets = choices if "ts" in recipe_parts(recipe) else [None]
        for taps in dict.fromkeys(tuple(t) if t else None for t in tap_sets):
            emp_layers = layers if "emp" in recipe_parts(recipe) else []
            variant = {
                **spec,
                "recipe": recipe,
                "layers": emp_layers,
                "depth": depth,
                "subset": None,
            }
            variant["taps"] = list(taps) if taps else None
            variant["tensors"] = row_tensors(variant)
            out.append({"recipe": recipe, "taps": variant["taps"], "bytes": row_bytes(variant)})
    return out


def tsfsar_side_width(width: int) -> int:
    """Side-network width: the released 256 for ViT-B/16 and wider; a third of narrower widths
    (a multiple of 8) so the PCA of a block's weights exists."""
    return TSFSAR_SIDE_WIDTH if width >= 3 * TSFSAR_SIDE_WIDTH else max(8, width // 3 // 8 * 8)


def tsfsar_init_shapes(
    depth: int, side_width: int, adapter_dim: int, mlp_ratio: float = TSFSAR_MLP_RATIO
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of `weights/tsfsar_init.safetensors` (torch Linear layout: out x in):
    every CLIP block k's side block `block{k:02d}.*`, then `adapter.attn.*` at the adapter width."""
    hidden = int(side_width * mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(1, depth + 1):
        block = f"block{k:02d}"
        for norm in ("norm1", "norm2"):
            shapes[f"{block}.{norm}.weight"] = (side_width,)
            shapes[f"{block}.{norm}.bias"] = (side_width,)
        for proj in ("q", "k", "v", "proj"):
            shapes[f"{block}.attn.{proj}.weight"] = (side_width, side_width)
            shapes[f"{block}.attn.{proj}.bias"] = (side_width,)
        shapes[f"{block}.mlp.fc1.weight"] = (hidden, side_width)
        shapes[f"{block}.mlp.fc1.bias"] = (hidden,)
        shapes[f"{block}.mlp.fc2.weight"] = (side_width, hidden)
        shapes[f"{block}.mlp.fc2.bias"] = (side_width,)
    for proj in ("q", "k", "v", "proj"):
        shapes[f"adapter.attn.{proj}.weight"] = (adapter_dim, adapter_dim)
        shapes[f"adapter.attn.{proj}.bias"] = (adapter_dim,)
    return shapes


def check_tsfsar_init(tensors: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """ValueError unless a side-network init holds exactly the keys and shapes its config implies."""
    try:
        if not 1 <= int(config["depth"]) <= MAX_TAPS:
            raise ValueError(f"depth {config['depth']}")
        want = tsfsar_init_shapes(
            int(config["depth"]),
            int(config["side_width"]),
            int(config["adapter_dim"]),
            float(config["mlp_ratio"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"its config lacks depth/side_width/adapter_dim/mlp_ratio ({exc!r})"
        ) from None
    if set(tensors) != set(want):
        odd = sorted(set(tensors) ^ set(want))
        raise ValueError(f"its keys differ from those its config implies (e.g. {odd[0]})")
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{key} has shape {tuple(tensors[key].shape)}, its config implies {shape}"
            )


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
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    fields: Sequence[str] = SPEC_IDENTITY_FIELDS + RECIPE_IDENTITY_FIELDS,
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
    taps: Sequence[int] | None = None,
    depth: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    codec: Mapping[str, Any] | None = None,
    versions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A complete spec dict (the `tensors` list is filled in by `create_store`).

    Recipes with `ts` record the ViT's `depth` and the `taps` (default: all of 0..depth); a recipe
    without `emp` caches no `tokens/` layers (`layers` is then empty).
    """
    parts = recipe_parts(recipe)
    spec: dict[str, Any] = {
        "model": model,
        "pretrained": pretrained,
        "weights_sha256": weights_sha256,
        "image_size": int(image_size),
        "preprocess": dict(preprocess),
        "frames": int(frames),
        "views": int(views),
        "recipe": recipe,
        "layers": [int(x) for x in layers] if "emp" in parts else [],
        "tokens": int(tokens),
        "dim": int(dim),
        "width": int(width),
        "patch_grid": [int(x) for x in patch_grid],
        "dtype": "float16",
        "compute": {"device": device, "precision": precision},
        "versions": dict(versions or {}),
    }
    if "ts" in parts:
        if depth is None:
            raise ValueError("recipe ts needs the ViT's depth")
        spec["depth"] = int(depth)
        spec["taps"] = check_taps(default_taps(depth) if taps is None else list(taps), depth)
    elif taps is not None:
        raise ValueError(f"taps are for recipes with ts, not {recipe}")
    if codec is not None:
        spec["codec"] = dict(codec)
    spec["tensors"] = row_tensors(spec)
    return spec
