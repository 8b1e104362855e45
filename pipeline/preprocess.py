"""Frame preprocessing: `openclip` (exactly open_clip's eval transform) and `emp` (EMP-Net's transforms).

A preprocessing is described by a plain dict (the store spec's `preprocess`), so the decode child can
rebuild it without loading the model:

- `openclip`: open_clip's own `image_transform_v2(PreprocessCfg(...), is_train=False)` built from the
  model's `visual.preprocess_cfg`, applied per frame through PIL, as `create_model_and_transforms` does.
- `emp`: EMP-Net's released test pipeline (`ToTensorVideo`, `KineticsResizedCropFewshot` with
  TEST_SCALE 256 and one centre crop, `NormalizeVideo`): uint8 frames to float, divided by 255, every
  frame resized to 256 x 256 whatever its aspect ratio (`torch.nn.functional.interpolate`, bilinear,
  no antialiasing), centre crop 224 at offset `(256 - 224) // 2 = 16`, CLIP mean/std. For a model
  whose input is not 224 px the same ratio is kept: resize to `round(S * 256 / 224)` square, crop `S`.

`transform_video` applies a preprocessing to the V views of one video: view 0, and every view of a
video outside the train split, get the transform above; views 1..V-1 of a train video get the training
augmentation the spec names (`train_augment`): `flip-crop` for `emp` (the released training transform:
horizontal flip with probability 1/2, the same 256 x 256 resize, a random 224 crop at offsets drawn
uniformly from 0..31), `crop` for `emp-noflip` (the same without the flip: TS-FSAR's SSv2 configs
leave AUGMENTATION.RANDOM_FLIP unset), `none` for `openclip`. Flip and crop are drawn per view from a
generator seeded by a stable hash of `video_id`, so they are the same on every machine (a `crop`
view has the crop of the `flip-crop` view it would be).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.hashing import stable_hash

PREPROCESS_NAMES = ("openclip", "emp", "emp-noflip")
TRAIN_AUGMENTS = {"emp": "flip-crop", "emp-noflip": "crop"}  # views 1.. of train videos
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EMP_TEST_SCALE = 256  # DATA.TEST_SCALE and TRAIN_JITTER_SCALES [256, 256]
EMP_TEST_CROP = 224  # DATA.TEST_CROP_SIZE and TRAIN_CROP_SIZE
FLIP_PROBABILITY = 0.5  # torchvision RandomHorizontalFlipVideo's default p


@dataclass(frozen=True)
class Augment:
    """One view's training augmentation: flip first, then the crop's top-left corner (x, y)."""

    flip: bool
    x: int
    y: int


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
    if name in TRAIN_AUGMENTS:
        return {
            "name": "emp",
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            "resize": round(crop * EMP_TEST_SCALE / EMP_TEST_CROP),
            "crop": crop,
            "interpolation": "bilinear",
            "resize_mode": "squash",
            "train_augment": TRAIN_AUGMENTS[name],
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


def _emp_transform(spec: dict[str, Any]) -> Callable[..., np.ndarray]:
    """`apply(frames)` (test) or `apply(frames, augment)` (training), frames (N, H, W, 3) uint8.

    Tensors are laid out as the released code has them, (3, N, H, W), so every operation runs on the
    same memory layout as there; the result is returned as (N, 3, S, S)."""
    import torch

    side = int(spec["resize"])
    crop = int(spec["crop"])
    mean = torch.tensor(spec["mean"], dtype=torch.float32)[:, None, None, None]
    std = torch.tensor(spec["std"], dtype=torch.float32)[:, None, None, None]
    centre = (side - crop) // 2

    def apply(frames: np.ndarray, augment: Augment | None = None) -> np.ndarray:
        clip = torch.from_numpy(np.ascontiguousarray(frames)).float().permute(3, 0, 1, 2) / 255.0
        if augment is not None and augment.flip:
            clip = clip.flip(-1)
        resized = torch.nn.functional.interpolate(clip, size=(side, side), mode="bilinear")
        x, y = (augment.x, augment.y) if augment is not None else (centre, centre)
        cropped = resized[:, :, y : y + crop, x : x + crop]
        return ((cropped - mean) / std).permute(1, 0, 2, 3).contiguous().numpy()

    return apply


def build_transform(spec: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping RGB frames `(N, H, W, 3)` uint8 to `(N, 3, S, S)` float32 model input."""
    if spec["name"] == "openclip":
        return _openclip_transform(spec)
    if spec["name"] == "emp":
        return _emp_transform(spec)
    raise ValueError(f"unknown preprocessing {spec['name']!r}")


def augment_params(spec: dict[str, Any], video_id: str, view: int) -> Augment:
    """The training flip and crop of `view` of `video_id` (seeded, the same on every machine)."""
    rng = np.random.default_rng([stable_hash(video_id), view, 1])
    flip = bool(rng.random() < FLIP_PROBABILITY) and spec.get("train_augment") == "flip-crop"
    margin = int(spec["resize"]) - int(spec["crop"])  # released: int(random.uniform(0, x_max))
    x = int(rng.uniform(0, margin))
    y = int(rng.uniform(0, margin))
    return Augment(flip, x, y)


def transform_video(
    spec: dict[str, Any],
    transform: Callable[..., np.ndarray],
    pixels: np.ndarray,
    video_id: str,
    train: bool,
) -> np.ndarray:
    """Model input `(V, T, 3, S, S)` of one video's frames `(V, T, H, W, 3)`; `transform` is
    `build_transform(spec)`. Views 1.. of a train video get the spec's training augmentation.

    Each view is transformed on its own, as the released code transforms one clip of T frames: the
    interpolation's float rounding depends on how many frames go through it together."""
    augmented = train and spec.get("train_augment", "none") in ("flip-crop", "crop")
    outs = [
        transform(frames, augment_params(spec, video_id, v))
        if augmented and v > 0
        else transform(frames)
        for v, frames in enumerate(pixels)
    ]
    return np.stack(outs)
