"""Recipes with `ts` in the store: resid/ taps, schema 2, the side-network init file, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cli
from bench.common import vit_b16_spec
from store import CorruptStoreError, SpecMismatchError, open_store, spec_differences
from store.layout import (
    TSFSAR_INIT_NAME,
    build_spec,
    evenly_spaced_taps,
    recipe_sizes,
    row_bytes,
    tsfsar_init_shapes,
)
from store.merge import merge, subset
from store.random_store import random_spec, random_tsfsar_init, write_random_store
from store.sizes import markdown_table, reference_spec
from store.weights_format import weights_to_bytes

runner = CliRunner()
SPLITS = {"train": 2, "val": 1, "test": 1}


def _names(spec: dict) -> list[str]:
    return [e["name"] for e in spec["tensors"]]


@pytest.fixture(scope="module")
def ts_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ts") / "store"
    spec = random_spec(recipe="ts", taps=[0, 4, 8, 12], width=48, dim=32)
    write_random_store(
        path, spec, SPLITS, 2, tsfsar_init=random_tsfsar_init(spec), descriptions=True
    ).close()
    return path


def test_recipes_name_their_arrays() -> None:
    ts = random_spec(recipe="ts", taps=[0, 6, 12])
    assert _names(ts) == ["resid/layer00", "resid/layer06", "resid/layer12", "cls/layer12"]
    assert ts["layers"] == [] and ts["depth"] == 12
    both = random_spec(recipe="emp+last+ts", taps=[0, 12])
    assert _names(both)[-3:] == ["tokens/layer12_in", "resid/layer00", "resid/layer12"]
    assert _names(both).count("cls/layer12") == 1  # shared by emp and ts
    assert random_spec(recipe="ts")["taps"] == list(range(13))  # default: every tap


@pytest.mark.parametrize(
    ("recipe", "taps", "message"),
    [
        ("ts", [0, 13], "increasing ints within 0..12"),
        ("ts", [4, 4, 8], "increasing ints within 0..12"),
        ("ts", [12], "at least two ints"),
        ("emp", [0, 12], "taps are for recipes with ts"),
        ("emp+ts+last", None, "unknown recipe"),
    ],
)
def test_bad_taps_and_recipes_are_refused(recipe: str, taps: list | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        random_spec(recipe=recipe, taps=taps)


def test_ts_store_reads_back_and_has_schema_2(ts_store: Path) -> None:
    with open_store(ts_store) as s:
        assert s.attrs["schema_version"] == 2
        out = s.read([0, 3], ["resid/layer04", "cls/layer12"])
        assert out["resid/layer04"].shape == (2, 1, 4, 5, 48)  # rows, V, T, tokens, width
        assert out["cls/layer12"].shape == (2, 1, 4, 32)
        assert s.text("descriptions")[0].shape == (len(s.classes), 1, 32)
        tensors, config = s.read_tsfsar_init()
        assert config["side_width"] == 16 and config["adapter_dim"] == 32
        assert tensors["block12.mlp.fc2.weight"].shape == (16, 64)
        assert s.verify() == []
    emp = tmp = ts_store.parent / "emp"
    write_random_store(tmp, random_spec(), SPLITS, 1).close()
    assert json.loads((emp / "zarr.json").read_text())["attributes"]["schema_version"] == 1


def test_damaged_side_init_is_reported(ts_store: Path, tmp_path: Path) -> None:
    spec = random_spec(recipe="ts", taps=[0, 12], width=48, dim=32)
    tensors, config = random_tsfsar_init(spec)
    tensors["block03.attn.q.weight"] = np.zeros((3, 3), np.float32)
    s = write_random_store(tmp_path / "s", spec, SPLITS, 1)
    s.write_weights_file(TSFSAR_INIT_NAME, weights_to_bytes(tensors, config))
    s.close()
    with open_store(tmp_path / "s") as s:
        with pytest.raises(CorruptStoreError, match=r"block03.attn.q.weight has shape \(3, 3\)"):
            s.read_tsfsar_init()
        assert [p.tensor for p in s.verify()] == ["weights/tsfsar_init.safetensors"]


def test_taps_are_part_of_the_identity(ts_store: Path, tmp_path: Path) -> None:
    a = random_spec(recipe="ts", taps=[0, 4, 8, 12], width=48, dim=32)
    b = random_spec(recipe="ts", taps=[0, 12], width=48, dim=32)
    assert spec_differences(a, b) == ["taps: [0, 4, 8, 12] != [0, 12]"]
    write_random_store(tmp_path / "b", b, SPLITS, 1).close()
    with pytest.raises(SpecMismatchError, match="taps"):
        merge(ts_store, tmp_path / "b", tmp_path / "out")


def test_subset_keeps_some_taps_and_the_init(ts_store: Path, tmp_path: Path) -> None:
    subset(ts_store, tmp_path / "sub", tensors=["resid/layer00", "resid/layer12", "cls/layer12"])
    with open_store(tmp_path / "sub") as sub, open_store(ts_store) as src:
        assert sub.row_tensors == ["resid/layer00", "resid/layer12", "cls/layer12"]
        np.testing.assert_array_equal(
            sub.read([1], ["resid/layer12"])["resid/layer12"],
            src.read([1], ["resid/layer12"])["resid/layer12"],
        )
        assert sub.read_tsfsar_init()[1] == src.read_tsfsar_init()[1]


def test_sizes_per_recipe_for_vit_b16() -> None:
    spec = vit_b16_spec()
    sizes = {(r["recipe"], len(r["taps"] or [])): r["bytes"] for r in recipe_sizes(spec)}
    per_tap = 197 * 768 * 8 * 2  # tokens x width x frames x fp16: the 2.42 MB
    cls12 = 8 * 512 * 2
    assert sizes[("ts", 13)] == 13 * per_tap + cls12  # 31.5 MB
    assert sizes[("ts", 4)] == 4 * per_tap + cls12
    assert sizes[("emp+ts", 13)] == sizes[("emp", 0)] + 13 * per_tap
    assert evenly_spaced_taps(12, 3) == [0, 4, 8, 12]
    ts = build_spec(**{**_b16_fields(spec), "recipe": "ts", "taps": [0, 4, 8, 12], "depth": 12})
    assert row_bytes(ts) == sizes[("ts", 4)]


def _b16_fields(spec: dict) -> dict:
    keep = ("model", "pretrained", "weights_sha256", "image_size", "preprocess", "frames")
    more = ("views", "layers", "tokens", "dim", "width", "patch_grid")
    return {k: spec[k] for k in keep + more}


def test_init_shapes_follow_the_released_side_network() -> None:
    shapes = tsfsar_init_shapes(depth=12, side_width=256, adapter_dim=512)
    assert len(shapes) == 12 * 16 + 8
    assert shapes["block01.mlp.fc1.weight"] == (1024, 256)
    assert shapes["block12.attn.proj.bias"] == (256,)
    assert shapes["adapter.attn.v.weight"] == (512, 512)


def test_store_info_prints_sizes_per_recipe(ts_store: Path) -> None:
    result = runner.invoke(cli.store_app, ["info", str(ts_store)])
    assert result.exit_code == 0, result.output
    assert "taps         0,4,8,12 (4)  W=48" in result.output
    lines = [x for x in result.output.splitlines() if x.strip().startswith("ts ")]
    assert len(lines) == 3  # all taps, 6 and 3 side blocks


def test_extraction_doc_holds_the_generated_size_table() -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "extraction.md").read_text()
    assert markdown_table(reference_spec()) in doc  # regenerate with python -m store.sizes


def test_pack_unpack_and_merge_keep_taps_and_init(ts_store: Path, tmp_path: Path) -> None:
    from store.pack import pack, unpack

    pack(ts_store, tmp_path / "ts.fsar.zip")
    names = ["resid/layer08", "cls/layer12"]
    with open_store(ts_store) as src, open_store(tmp_path / "ts.fsar.zip") as packed:
        for name in names:
            np.testing.assert_array_equal(
                packed.read([2], [name])[name], src.read([2], [name])[name]
            )
        assert packed.read_tsfsar_init()[1] == src.read_tsfsar_init()[1]
        assert (
            unpack(tmp_path / "ts.fsar.zip", tmp_path / "back").fingerprint() == src.fingerprint()
        )
    spec = random_spec(recipe="ts", taps=[0, 4, 8, 12], width=48, dim=32)
    init = random_tsfsar_init(spec)
    write_random_store(tmp_path / "a", spec, {"train": 2}, 2, tsfsar_init=init).close()
    write_random_store(tmp_path / "b", spec, {"test": 2}, 2, seed=1, tsfsar_init=init).close()
    merge(tmp_path / "a", tmp_path / "b", tmp_path / "ab")
    with open_store(tmp_path / "ab") as ab, open_store(tmp_path / "b") as b:
        assert ab.spec["taps"] == [0, 4, 8, 12] and ab.verify() == []
        rows = ab.select(split="test")
        np.testing.assert_array_equal(
            ab.read(rows, ["resid/layer04"])["resid/layer04"],
            b.read(b.select(split="test"), ["resid/layer04"])["resid/layer04"],
        )
        assert ab.read_tsfsar_init()[1] == b.read_tsfsar_init()[1]


def test_ts_store_reads_over_http_like_the_local_one(ts_store: Path, tmp_path: Path) -> None:
    import shutil

    from tests.store_http import serve

    shutil.copytree(ts_store, tmp_path / "www" / "ts")
    with serve(tmp_path / "www") as (url, _), open_store(url + "/ts") as remote:
        with open_store(ts_store) as local:
            names = ["resid/layer00", "resid/layer12", "cls/layer12"]
            got, want = remote.read([3, 1], names, verify=True), local.read([3, 1], names)
            for name in names:
                np.testing.assert_array_equal(got[name], want[name])
            assert remote.read_tsfsar_init()[1] == local.read_tsfsar_init()[1]
            assert remote.fingerprint() == local.fingerprint() and remote.verify() == []
