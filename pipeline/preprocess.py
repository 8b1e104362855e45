"""Frame preprocessing: `openclip` (exactly open_clip's eval transform) and `emp` (EMP-Net's test transform).

A preprocessing is described by a plain dict (the store spec's `preprocess`), so the decode child can
rebuild it without loading the model:

- `openclip`: open_clip's own `image_transform_v2(PreprocessCfg(...), is_train=False)` built from the
  model's `visual.preprocess_cfg`, applied per frame through PIL, as `create_model_and_transforms` does.
- `emp`: EMP-Net's released test pipeline (TAdaConv `KineticsResizedCrop` with one spatial crop): frames
  scaled to [0, 1], short side resized to 256 with `torch.nn.functional.interpolate(mode="bilinear")`
  (long side `int(long / short * 256)`), centre crop 224 at offsets `(side - 224) // 2`, CLIP mean/std.
  For a model whose input is not 224 px the same ratio is kept: resize `round(S * 256 / 224)`, crop `S`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

PREPROCESS_NAMES = ("openclip", "emp")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMP_TEST_SCALE = 256
EMP_TEST_CROP = 224


def _square_size(size: Any) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"only square model inputs are supported, got image size {size}")
        return int(size[0])
    return int(size)


def preprocess_spec(name: str, openclip_cfg: dict[str, Any]) -> dict[str, Any]:
    """The spec's `preprocess` dict for `name`, given the model's open_clip preprocessing settings.

    `openclip_cfg` holds open_clip `PreprocessCfg` fields (`size` or `image_size`, `mean`, `std`,
    `interpolation`, `resize_mode`, `fill_color`), e.g. `LoadedClip.preprocess.as_dict()`.
    """
    openclip_cfg = dict(openclip_cfg)
    if "size" not in openclip_cfg:
        openclip_cfg["size"] = openclip_cfg["image_size"]
    crop = _square_size(openclip_cfg["size"])
    if name == "openclip":
        return {
            "name": "openclip",
            "mean": [float(v) for v in openclip_cfg["mean"]],
            "std": [float(v) for v in openclip_cfg["std"]],
            "resize": crop,
            "crop": crop,
            "size": list(openclip_cfg["size"])
            if isinstance(openclip_cfg["size"], (list, tuple))
            else int(openclip_cfg["size"]),
            "interpolation": str(openclip_cfg.get("interpolation", "bicubic")),
            "resize_mode": str(openclip_cfg.get("resize_mode", "shortest")),
            "fill_color": int(openclip_cfg.get("fill_color", 0)),
        }
    if name == "emp":
        return {
            "name": "emp",
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            "resize": round(crop * EMP_TEST_SCALE / EMP_TEST_CROP),
            "crop": crop,
            "interpolation": "bilinear",
            "resize_mode": "shortest",
        }
    raise ValueError(f"unknown preprocessing {name!r}; choose one of {', '.join(PREPROCESS_NAMES)}")


def _openclip_transform(spec: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    size = spec["size"]
    cfg = PreprocessCfg(
        size=tuple(size) if isinstance(size, list) else size,
        mean=tuple(spec["mean"]),
        std=tuple(spec["std"]),
        interpolation=spec["interpolation"],
        resize_mode=spec["resize_mode"],
        fill_color=spec["fill_color"],
    )
    transform = image_transform_v2(cfg, is_train=False)

    def apply(frames: np.ndarray) -> np.ndarray:
        tensors = [transform(Image.fromarray(frame)) for frame in frames]
        return torch.stack(tensors).numpy()

    return apply


def _emp_transform(spec: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    short_side = int(spec["resize"])
    crop = int(spec["crop"])
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def apply(frames: np.ndarray) -> np.ndarray:
        clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        height, width = clip.shape[-2:]
        if height < width:
            new_height, new_width = short_side, int(width / height * short_side)
        else:
            new_width, new_height = short_side, int(height / width * short_side)
        resized = torch.nn.functional.interpolate(
            clip, size=(new_height, new_width), mode="bilinear"
        )
        y = (new_height - crop) // 2
        x = (new_width - crop) // 2
        cropped = resized[:, :, y : y + crop, x : x + crop]
        return ((cropped - mean) / std).contiguous().numpy()

    return apply


def build_transform(spec: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping RGB frames `(N, H, W, 3)` uint8 to `(N, 3, S, S)` float32 model input."""
    if spec["name"] == "openclip":
        return _openclip_transform(spec)
    if spec["name"] == "emp":
        return _emp_transform(spec)
    raise ValueError(f"unknown preprocessing {spec['name']!r}")
