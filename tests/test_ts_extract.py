"""Extraction of recipes with `ts`: the residual-stream taps, class descriptions, the side init,
resume and pieces, with the tiny ViT on a small synthetic dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.descriptions import (
    DescriptionsError,
    embed_classes,
    load_descriptions,
    mean_embedding,
)
from pipeline.encoder import FrameEncoder
from pipeline.errors import EncoderError
from pipeline.model import TINY_MODEL, load_clip
from pipeline.synth import make_synthetic_dataset
from store import open_store

TINY = ["--model", TINY_MODEL, "--pretrained", "none"]
TAPS = [0, 4, 8, 12]


@pytest.fixture(scope="module")
def tiny():
    return load_clip(TINY_MODEL, "none")


def frames(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def open_clip_taps(clip, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """ln_pre's and every resblock's output in open_clip's own forward, its image embedding, and
    how many resblock calls that forward made."""
    visual = clip.visual
    seen: list[torch.Tensor] = []
    hooks = [visual.ln_pre.register_forward_hook(lambda m, i, o: seen.append(o))]
    hooks += [
        b.register_forward_hook(lambda m, i, o: seen.append(o))
        for b in visual.transformer.resblocks
    ]
    with torch.no_grad():
        image = clip.model.encode_image(x)
    for h in hooks:
        h.remove()
    return seen, image, len(seen) - 1


def test_taps_are_the_raw_residual_stream_of_one_forward(tiny) -> None:
    x = frames(3)
    seen, image, _ = open_clip_taps(tiny, x)
    calls = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: calls.append(1))
        for b in tiny.visual.transformer.resblocks
    ]
    out = FrameEncoder(tiny, recipe="emp+last+ts", taps=TAPS).encode_torch(x)
    for h in hooks:
        h.remove()
    assert len(calls) == 12  # one pass over the blocks serves all three components
    for k in TAPS:  # all 17 tokens, width 64, before ln_post, not projected
        torch.testing.assert_close(out[f"resid/layer{k:02d}"], seen[k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["tokens/layer12_in"], seen[11], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["tokens/layer12"][:, 0], image, atol=1e-5, rtol=1e-5)
    emp = FrameEncoder(tiny, recipe="emp").encode_torch(x)
    torch.testing.assert_close(out["tokens/layer08"], emp["tokens/layer08"])


def test_ts_without_emp_writes_the_projected_cls_itself(tiny) -> None:
    x = frames(2, seed=1)
    _, image, _ = open_clip_taps(tiny, x)
    enc = FrameEncoder(tiny, recipe="ts")
    assert enc.names == [f"resid/layer{k:02d}" for k in range(13)] + ["cls/layer12"]
    torch.testing.assert_close(enc.encode_torch(x)["cls/layer12"], image, atol=1e-5, rtol=1e-5)
    with pytest.raises(EncoderError, match="increasing ints within 0..12"):
        FrameEncoder(tiny, recipe="ts", taps=[0, 13])


# ---------------------------------------------------------------------- class descriptions
def write_json(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not JSON (line 1"),
        (["a", "b"], "holds no classes"),
        ({"run": "a man runs"}, "class 'run' needs a list of 1 to"),
        ({"run": []}, "class 'run' needs a list"),
        ({"run": ["fine", ""]}, "class 'run' needs a list"),
    ],
)
def test_malformed_description_files_are_refused(
    tmp_path: Path, content: object, message: str
) -> None:
    path = write_json(tmp_path / "prompts.json", content)
    with pytest.raises(DescriptionsError) as error:
        load_descriptions([path])
    assert message in str(error.value) and str(path) in str(error.value)
    assert "prompts/*.json format" in str(error.value)


def test_two_files_merge_and_a_conflict_is_refused(tmp_path: Path) -> None:
    a = write_json(tmp_path / "train.json", {"run": ["a man runs"], "jump": ["a girl jumps"]})
    b = write_json(tmp_path / "test.json", {"swim": ["someone swims"], "run": ["a man runs"]})
    assert sorted(load_descriptions([a, b]).sentences) == ["jump", "run", "swim"]
    c = write_json(tmp_path / "other.json", {"run": ["a dog runs"]})
    with pytest.raises(DescriptionsError, match="'run' is described differently"):
        load_descriptions([a, c])


def test_class_embedding_is_the_normalised_mean_of_normalised_sentences(tiny) -> None:
    tokenizer = tiny.tokenizer()
    sentences = ["a person brushes their hair", "hair is combed slowly"]
    with torch.no_grad():
        raw = tiny.model.encode_text(tokenizer(sentences)).float()
    unit = raw / raw.norm(dim=-1, keepdim=True)
    want = unit.mean(0) / unit.mean(0).norm()
    got = mean_embedding(tiny.model, tokenizer, sentences)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
    long = " ".join(["word"] * 80)  # past the 77-token context: the tokenizer cuts it
    np.testing.assert_allclose(
        mean_embedding(tiny.model, tokenizer, [long + " one"]),
        mean_embedding(tiny.model, tokenizer, [long + " two"]),
    )


def test_undescribed_classes_fall_back_to_the_templates(tiny, tmp_path: Path) -> None:
    from pipeline.text import EMP16_TEMPLATES

    path = write_json(tmp_path / "p.json", {"brush hair": ["someone brushes hair"]})
    emb, fallback = embed_classes(
        tiny.model, tiny.tokenizer(), ["brush_hair", "cartwheel"], load_descriptions([path])
    )
    assert emb.shape == (2, 1, 32) and fallback == ["cartwheel"]
    templates = [t.replace("{}", "cartwheel") for t in EMP16_TEMPLATES]
    np.testing.assert_allclose(
        emb[1, 0], mean_embedding(tiny.model, tiny.tokenizer(), templates), atol=1e-6
    )
    np.testing.assert_allclose(np.linalg.norm(emb[:, 0], axis=-1), 1.0, atol=1e-6)


# ---------------------------------------------------------------------- fsar-extract end to end
def invoke(*args: str) -> object:
    from cli import extract_app

    return CliRunner().invoke(extract_app, list(args))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """6 classes x 2 synthetic videos, and a descriptions file for the train and test classes."""
    root = tmp_path_factory.mktemp("ts") / "data"
    made = make_synthetic_dataset(root, classes=6, videos_per_class=2, seed=3)
    described = made["classes"]["train"] + made["classes"]["test"]
    prompts = {c: [f"a clip in which shapes are {c}", f"{c}, filmed"] for c in described}
    return root, write_json(root.parent / "prompts.json", prompts)


def extract(data: Path, store: Path, *extra: str) -> object:
    return invoke(
        "--dataset", "folder", "--data-root", str(data), "--store", str(store), *TINY,
        "--workers", "1", "--no-progress", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def emp_ts_store(dataset: tuple[Path, Path]) -> tuple[Path, object]:
    data, prompts = dataset
    store = data.parent / "emp_ts"
    taps = ",".join(map(str, TAPS))
    return store, extract(
        data, store, "--recipe", "emp+ts", "--taps", taps, "--class-descriptions", str(prompts)
    )


@pytest.mark.slow
def test_emp_ts_store_holds_taps_text_and_side_init(
    emp_ts_store: tuple[Path, object], dataset: tuple[Path, Path], tiny
) -> None:
    from pipeline.decoding import decode_sampled
    from pipeline.preprocess import build_transform

    path, result = emp_ts_store
    assert result.exit_code == 0, result.output
    assert "note: 2 of 6 classes have no description" in result.output  # the val classes
    with open_store(path) as store:
        assert store.verify() == [] and store.spec["taps"] == TAPS
        assert len(store.select(status="ok")) == 12
        row = int(store.select(split="val")[0])
        cached = store.read([row], [f"resid/layer{k:02d}" for k in TAPS] + ["cls/layer12"])
        entry, spec = store.manifest.iloc[row], store.spec
        text, provenance = store.text("descriptions")
        assert text.shape == (6, 1, 32) and "prompts.json (sha256" in provenance[0]
        tensors, config = store.read_tsfsar_init()
        assert config["pca"]["method"] == "released" and config["side_width"] == 16
    sampled = decode_sampled(dataset[0] / entry["relpath"], 8, 1, entry["video_id"])
    pixels = build_transform(spec["preprocess"])(sampled.frames[0])
    seen, image, _ = open_clip_taps(tiny, torch.as_tensor(pixels))
    for k in TAPS:
        want = seen[k].numpy()
        got = cached[f"resid/layer{k:02d}"][0, 0].astype(np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    np.testing.assert_allclose(cached["cls/layer12"][0, 0], image.numpy(), rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_ts_store_in_pieces_equals_the_combined_store(
    emp_ts_store: tuple[Path, object], dataset: tuple[Path, Path]
) -> None:
    data, _ = dataset
    combined, _ = emp_ts_store
    pieces = data.parent / "ts_pieces"
    taps = ",".join(map(str, TAPS))
    first = extract(data, pieces, "--recipe", "ts", "--taps", taps, "--part", "1/2")
    assert first.exit_code == 0, first.output
    refused = extract(data, pieces, "--recipe", "ts", "--taps", "0,12")
    assert refused.exit_code == 2 and "taps: [0, 4, 8, 12] != [0, 12]" in refused.output
    second = extract(data, pieces, "--recipe", "ts", "--taps", taps)  # resumes the rest
    assert second.exit_code == 0, second.output
    with open_store(pieces) as ts, open_store(combined) as both:
        assert ts.verify() == [] and "tokens/layer12" not in ts.row_tensors
        assert ts.manifest["video_id"].tolist() == both.manifest["video_id"].tolist()
        rows = ts.select(status="ok")
        assert len(rows) == 12
        names = [f"resid/layer{k:02d}" for k in TAPS] + ["cls/layer12"]
        a, b = ts.read(rows, names), both.read(rows, names)
        for name in names:  # CPU: one forward per video, so the same values bit for bit
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert ts.read_tsfsar_init()[1] == both.read_tsfsar_init()[1]
        np.testing.assert_array_equal(
            ts.read_tsfsar_init()[0]["adapter.attn.q.weight"],
            both.read_tsfsar_init()[0]["adapter.attn.q.weight"],
        )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--recipe", "ts", "--taps", "0,13"], "--taps 0,13: give at least two increasing ints"),
        (["--recipe", "ts", "--taps", "4,x"], "--taps 4,x"),
        (["--recipe", "emp", "--taps", "0,12"], "--taps is for recipes with ts"),
        (["--recipe", "ts", "--side-pca", "svd"], "--side-pca 'svd': use released or exact"),
        (["--recipe", "tsfsar"], "--recipe 'tsfsar': use one of emp, emp+last, ts"),
    ],
)
def test_recipe_option_errors_exit_2_in_one_line(
    dataset: tuple[Path, Path], tmp_path: Path, extra: list[str], message: str
) -> None:
    result = extract(dataset[0], tmp_path / "s", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_description_file_errors_exit_2_before_any_store(
    dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    bad = write_json(tmp_path / "bad.json", '{"run": "no list"}')
    result = extract(dataset[0], tmp_path / "s", "--class-descriptions", str(bad))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith(f"error: --class-descriptions {bad}")
    other = write_json(tmp_path / "ucf.json", {"apply eye makeup": ["a woman applies makeup"]})
    result = extract(dataset[0], tmp_path / "s", "--class-descriptions", str(other))
    assert result.exit_code == 2 and "describes none of the 6 classes" in result.output
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_text_only_adds_descriptions_to_an_existing_store(
    emp_ts_store: tuple[Path, object], tmp_path: Path
) -> None:
    import shutil

    source, _ = emp_ts_store
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    with open_store(copy) as store:
        classes = store.classes
    every = write_json(tmp_path / "all.json", {c: [f"shapes {c}"] for c in classes})
    result = invoke("--store", str(copy), "--text-only", "--class-descriptions", str(every), *TINY)
    assert result.exit_code == 0, result.output
    assert "wrote text/descriptions (6 classes)" in result.output and "note:" not in result.output
    with open_store(copy) as store:
        text, provenance = store.text("descriptions")
        assert "all.json" in provenance[0] and "templates for" not in provenance[0]
        assert store.verify() == []
