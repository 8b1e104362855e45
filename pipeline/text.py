"""Class texts for the store's `text/<name>` arrays: templates, raw `encode_text` features, --text-only.

EMP-Net's 16 templates by default; why the features are not normalised: docs/extraction.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import EncoderError, ExtractError

if TYPE_CHECKING:
    from pipeline.model import LoadedClip
    from store import FeatureStore

__all__ = [
    "EMP16_TEMPLATES",
    "TemplateError",
    "validate_templates",
    "load_templates",
    "fill_template",
    "encode_class_texts",
    "add_text_embeddings",
    "load_store_model",
]

EMP16_TEMPLATES: tuple[str, ...] = (
    "a photo of action {}",
    "a picture of action {}",
    "Human action of {}",
    "{}, an action",
    "{} this is an action",
    "{}, a video of action",
    "Playing action of {}",
    "{}",
    "Playing a kind of action, {}",
    "Doing a kind of action, {}",
    "Look, the human is {}",
    "Can you recognize the action of {}?",
    "Video classification of {}",
    "A video of {}",
    "The man is {}",
    "The woman is {}",
)


class TemplateError(EncoderError):
    """A template set is empty, malformed or has duplicates (one-line message)."""


def _problem(template: str) -> str | None:
    if template.count("{}") != 1:
        return "must contain exactly one {}"
    rest = template.replace("{}", "")
    if "{" in rest or "}" in rest:
        return "has braces other than the single {}"
    return None


def validate_templates(templates: Sequence[str], source: str = "templates") -> list[str]:
    """Return the templates as a list, or raise TemplateError naming the first bad one."""
    out = [str(t) for t in templates]
    if not out:
        raise TemplateError(f"{source}: no templates (one per line, each containing {{}})")
    seen: set[str] = set()
    for i, t in enumerate(out, 1):
        why = _problem(t)
        if why:
            raise TemplateError(f"{source}: template {i} {t!r} {why}")
        if t in seen:
            raise TemplateError(f"{source}: template {i} {t!r} is a duplicate")
        seen.add(t)
    return out


def load_templates(path: str | os.PathLike[str]) -> list[str]:
    """Read a template file: UTF-8, one template per line containing ``{}`` for the class name.

    Blank lines and lines starting with ``#`` are skipped; surrounding whitespace is stripped.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TemplateError(f"template file not found: {path}") from None
    except UnicodeDecodeError:
        raise TemplateError(f"template file {path} is not UTF-8 text") from None
    except OSError as e:
        raise TemplateError(f"cannot read template file {path}: {e.strerror}") from None
    templates: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        why = _problem(line)
        if why:
            raise TemplateError(f"{p.name}:{lineno}: {line!r} {why}")
        templates.append(line)
    return validate_templates(templates, source=p.name)


def fill_template(template: str, class_name: str) -> str:
    """``template.format(class_name)``, safe for class names containing braces."""
    return template.replace("{}", class_name)


@torch.inference_mode()
def encode_class_texts(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str] = EMP16_TEMPLATES,
    batch_size: int = 256,
    device: Any = None,
) -> np.ndarray:
    """Raw ``model.encode_text`` features of every class under every template: (C, M, D) float32.

    Runs in fp32 (no autocast) on the model's device; rows follow ``class_names``, columns ``templates``.
    """
    templates = validate_templates(templates)
    names = [str(c) for c in class_names]
    if not names:
        raise TemplateError("no class names to encode")
    if device is None:
        device = next(model.parameters()).device
    prompts = [fill_template(t, c) for c in names for t in templates]
    feats = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i : i + batch_size]).to(device)
        feats.append(model.encode_text(tokens).float().cpu())
    out = torch.cat(feats).reshape(len(names), len(templates), -1)
    return out.numpy().astype(np.float32, copy=False)


def _templates_name(path: Path) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", path.stem.lower()).strip("_")
    if not name:
        raise ExtractError(f"--templates {path}: cannot make an array name from the file name")
    return name


def load_store_model(
    store: FeatureStore,
    model: str | None,
    pretrained: str | None,
    device: str,
    allow_torchscript: bool = False,
) -> LoadedClip:
    """The store's own model (or --model/--pretrained, checked to be the same weights by sha256)."""
    from pipeline.model import load_clip, resolve_device
    from pipeline.weights import choose_weights
    from store import SpecMismatchError

    model_name, weights = choose_weights(model, pretrained, store.spec, str(store.location.local))
    clip = load_clip(
        model_name, weights, device=resolve_device(device), allow_torchscript=allow_torchscript
    )
    if clip.model_name != store.spec["model"] or clip.weights_sha256 != store.spec.get(
        "weights_sha256"
    ):
        raise SpecMismatchError(
            f"{store.location.describe()} was extracted with {store.spec['model']} "
            f"({store.spec['pretrained']}); --model/--pretrained give {clip.model_name} "
            f"({clip.pretrained}): text features must come from the same model"
        )
    return clip


def add_text_embeddings(
    store_path: str,
    templates_file: str,
    model: str | None,
    pretrained: str | None,
    device: str,
    allow_torchscript: bool = False,
) -> tuple[str, tuple[int, ...]]:
    """`--text-only`: encode every class of an existing store under the templates in a file.

    Writes `text/<file stem>`; the model must be the store's (its weights' sha256 is checked).
    """
    from store import open_store

    templates = load_templates(templates_file)
    name = _templates_name(Path(templates_file))
    with open_store(Path(store_path), mode="a") as store:
        clip = load_store_model(store, model, pretrained, device, allow_torchscript)
        embeddings = encode_class_texts(clip.model, clip.tokenizer(), store.classes, templates)
        store.write_text(name, embeddings, templates)
    return name, tuple(embeddings.shape)
