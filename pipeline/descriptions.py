"""Class descriptions in TS-FSAR's `prompts/*.json` format, embedded as its `build_embeddings` does.

A file maps class names to sentences; each class becomes one unit vector (`text/descriptions`).
Classes no file describes (TS-FSAR ships train and test files only) use EMP-Net's 16 templates.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.errors import ExtractError
from pipeline.text import EMP16_TEMPLATES, fill_template

if TYPE_CHECKING:
    from pipeline.model import LoadedClip
    from store import FeatureStore

MAX_FILE_BYTES = 64 << 20  # the released files are a few hundred KB
MAX_SENTENCES = 10_000  # per class
FALLBACK_NAME = "emp16"  # the stated template set for classes without descriptions
FORMAT_HINT = 'give TS-FSAR\'s prompts/*.json format: {"class name": ["sentence", ...], ...}'


class DescriptionsError(ExtractError):
    """A descriptions file is missing, too large, not JSON or not {class: [sentences]}."""


@dataclass(frozen=True)
class Descriptions:
    """Sentences per class name from one or more files, and what was read."""

    sentences: dict[str, list[str]]
    files: list[tuple[str, str]]  # (file name, sha256)


def _read(path: Path) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise DescriptionsError(
                f"--class-descriptions {path}: larger than 64 MB; {FORMAT_HINT}"
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise DescriptionsError(f"--class-descriptions {path}: no such file") from None
    except IsADirectoryError:
        raise DescriptionsError(
            f"--class-descriptions {path} is a directory; give a file"
        ) from None
    except OSError as error:
        raise DescriptionsError(f"--class-descriptions {path}: {error.strerror}") from None


def _parse(path: Path, data: bytes) -> dict[str, list[str]]:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise DescriptionsError(
            f"--class-descriptions {path} is not UTF-8; {FORMAT_HINT}"
        ) from None
    except json.JSONDecodeError as error:
        raise DescriptionsError(
            f"--class-descriptions {path} is not JSON (line {error.lineno}: {error.msg}); "
            f"{FORMAT_HINT}"
        ) from None
    except RecursionError:
        raise DescriptionsError(
            f"--class-descriptions {path} nests too deeply; {FORMAT_HINT}"
        ) from None
    if not isinstance(parsed, dict) or not parsed:
        raise DescriptionsError(f"--class-descriptions {path} holds no classes; {FORMAT_HINT}")
    for name, sentences in parsed.items():
        if (
            not isinstance(sentences, list)
            or not 0 < len(sentences) <= MAX_SENTENCES
            or not all(isinstance(s, str) and s.strip() for s in sentences)
        ):
            raise DescriptionsError(
                f"--class-descriptions {path}: class {name[:80]!r} needs a list of 1 to "
                f"{MAX_SENTENCES} non-empty sentences; {FORMAT_HINT}"
            )
    return parsed


def load_descriptions(paths: Sequence[str | Path]) -> Descriptions:
    """Read and merge description files; a class two files describe differently is refused."""
    merged: dict[str, list[str]] = {}
    source: dict[str, Path] = {}
    files = []
    for raw in paths:
        path = Path(raw)
        data = _read(path)
        for name, sentences in _parse(path, data).items():
            if name in merged and merged[name] != sentences:
                raise DescriptionsError(
                    f"--class-descriptions: class {name[:80]!r} is described differently in "
                    f"{source[name]} and {path}; give one of them"
                )
            merged[name], source[name] = sentences, path
        files.append((path.name, hashlib.sha256(data).hexdigest()))
    return Descriptions(merged, files)


def description_key(class_name: str) -> str:
    """The key build_embeddings looks up: the class name with underscores as spaces."""
    return class_name.replace("_", " ")


@torch.inference_mode()
def mean_embedding(
    model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], sentences: Sequence[str]
) -> np.ndarray:
    """build_embeddings for one class: each sentence's text embedding (tokens cut at the context
    length, 77) normalised, the mean over sentences, normalised again. (D,) float32."""
    device = next(model.parameters()).device
    feats = torch.cat(
        [
            model.encode_text(tokenizer(list(sentences[i : i + 256])).to(device)).float()
            for i in range(0, len(sentences), 256)
        ]
    )
    feats = feats / feats.norm(dim=-1, keepdim=True)
    mean = feats.mean(dim=0)
    return (mean / mean.norm()).cpu().numpy().astype(np.float32)


def embed_classes(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classes: Sequence[str],
    descriptions: Descriptions,
) -> tuple[np.ndarray, list[str]]:
    """(C, 1, D) embeddings of every class and the classes that fell back to the templates."""
    rows, fallback = [], []
    for name in classes:
        sentences = descriptions.sentences.get(description_key(name))
        if sentences is None:
            fallback.append(name)
            sentences = [fill_template(t, name) for t in EMP16_TEMPLATES]
        rows.append(mean_embedding(model, tokenizer, sentences))
    return np.stack(rows)[:, None, :], fallback


def provenance(descriptions: Descriptions, fallback: Sequence[str]) -> str:
    """The one "template" string recorded with text/descriptions: files, hashes, fallbacks."""
    files = ", ".join(f"{name} (sha256 {sha[:16]})" for name, sha in descriptions.files)
    text = f"class descriptions from {files}: mean of normalised sentence embeddings, normalised"
    if fallback:
        text += f"; {FALLBACK_NAME} templates for {len(fallback)} classes: " + "; ".join(fallback)
    return text


def fallback_note(fallback: Sequence[str], total: int) -> str | None:
    """The line printed when some classes have no description."""
    if not fallback:
        return None
    shown = ", ".join(fallback[:8]) + (", ..." if len(fallback) > 8 else "")
    return (
        f"note: {len(fallback)} of {total} classes have no description in the files ({shown}); "
        f"they use EMP-Net's 16 templates, averaged the same way"
    )


def check_coverage(descriptions: Descriptions, classes: Sequence[str]) -> None:
    """Refuse files that describe none of the classes (another dataset's files), before any work."""
    if not any(description_key(c) in descriptions.sentences for c in classes):
        names = ", ".join(f for f, _ in descriptions.files)
        raise DescriptionsError(
            f"--class-descriptions {names}: describes none of the {len(classes)} classes "
            f"(e.g. {description_key(classes[0])!r}); give the files of this dataset"
        )


def write_descriptions(
    store: FeatureStore, clip: LoadedClip, descriptions: Descriptions
) -> list[str]:
    """Embed the descriptions of the store's classes into `text/descriptions`; returns the lines
    to print (a note naming the classes that fell back to the templates)."""
    from store.layout import TEXT_DESCRIPTIONS

    check_coverage(descriptions, store.classes)
    embeddings, fallback = embed_classes(clip.model, clip.tokenizer(), store.classes, descriptions)
    store.write_text(TEXT_DESCRIPTIONS, embeddings, [provenance(descriptions, fallback)])
    note = fallback_note(fallback, len(store.classes))
    return [note] if note else []


def add_descriptions(
    store_path: str,
    paths: Sequence[str],
    model: str | None,
    pretrained: str | None,
    device: str,
    allow_torchscript: bool = False,
) -> list[str]:
    """`--text-only --class-descriptions FILE`: add `text/descriptions` to an existing store."""
    from pipeline.text import load_store_model
    from store import open_store

    descriptions = load_descriptions(paths)
    with open_store(Path(store_path), mode="a") as store:
        check_coverage(descriptions, store.classes)
        clip = load_store_model(store, model, pretrained, device, allow_torchscript)
        lines = write_descriptions(store, clip, descriptions)
    return [*lines, f"{store_path}: wrote text/descriptions ({len(store.classes)} classes)"]
