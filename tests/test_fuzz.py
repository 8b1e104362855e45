"""Seeded fuzzing of everything a teammate can send: zarr.json files, the manifest, chunks, a run's
safetensors and a packed file's zip directory. Every damaged input must end in a one-line error
(exit 1 or 2) or in exactly the result of the undamaged input: never a traceback, a hang, a write
outside the target, or a result computed on the damage."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import cli
import heads
from heads.checkpoint import save_checkpoint
from store import open_store
from store.pack import pack
from tests.heads_fixtures import reversal_pair_store

runner = CliRunner()
SEED = 20261124
EVAL = ["--episodes", "10", "--way", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("runtime.memory.keep_freed_memory", lambda: False)
    monkeypatch.delenv("FSAR_VERIFY_READS", raising=False)
    monkeypatch.setenv("FSAR_REMOTE_RETRIES", "1")


def invoke(app, *args: object) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args}: {result.exception!r}") from result.exception
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def tree(root: Path, skip: Path | None = None) -> dict[str, int]:
    """Every file under `root` (but `skip`) with its size: a write anywhere shows up."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        if skip is not None and Path(dirpath).is_relative_to(skip):
            continue
        for name in files:
            path = os.path.join(dirpath, name)
            out[path] = os.lstat(path).st_size
    return out


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    store = root / "received" / "store"  # a copy at another path: as received from a teammate
    reversal_pair_store(
        root / "made", frames=2, views=1, dim=16, patches=4,
        classes={"train": 2, "val": 2, "test": 2}, videos_per_class=3,
    ).close()  # fmt: skip
    shutil.copytree(root / "made", store)
    shutil.rmtree(root / "made")
    # the same bytes on every run (no paths, no clock), so that a seed always damages the same bytes
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"].pop("written_on")
    meta["attributes"]["created_at"] = "2026-11-24T00:00:00+00:00"
    (store / "zarr.json").write_text(json.dumps(meta, indent=2))
    with open_store(store, mode="a") as s:
        when = pd.Timestamp("2026-11-24", tz="UTC")
        s.commit([{"row": r, "extracted_at": when} for r in range(s.n_rows)])
    s = open_store(store)
    torch.manual_seed(0)
    head = heads.create("emp", dim=16)
    head.prepare(s)
    run = root / "received" / "run"
    run.mkdir()
    save_checkpoint(run / "best.safetensors", head, {"store_spec": s.spec, "episode": 1})
    (run / "config.json").write_text(json.dumps({"store": {"path": str(store)}}))
    pack(store, root / "received" / "store.zip")
    return {"root": root, "store": store, "run": run, "zip": root / "received" / "store.zip"}


def flip(data: bytes, rng: np.random.Generator, start: int = 0, end: int | None = None) -> bytes:
    out = bytearray(data)
    end = len(out) if end is None else end
    for _ in range(int(rng.integers(1, 4))):
        out[int(rng.integers(start, end))] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def edit_shape(data: bytes, rng: np.random.Generator) -> bytes:
    """An array's zarr.json with its shape or chunk shape changed (huge, zero, negative, other)."""
    meta = json.loads(data)
    field = (
        meta["shape"] if rng.random() < 0.5 else meta["chunk_grid"]["configuration"]["chunk_shape"]
    )
    axis = int(rng.integers(0, len(field)))
    field[axis] = int(rng.choice([0, -1, 1, 2, field[axis] + 1, 10**6, 10**12, 2**62]))
    return json.dumps(meta).encode()


def edit_header_shape(data: bytes, rng: np.random.Generator) -> bytes:
    """A safetensors file whose JSON header gives one tensor another shape or dtype."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    key = str(rng.choice(sorted(k for k in header if k != "__metadata__")))
    if rng.random() < 0.5:
        header[key]["shape"] = [
            int(x) for x in rng.integers(1, 40, size=len(header[key]["shape"]) or 1)
        ]
    else:
        header[key]["dtype"] = str(rng.choice(["F16", "F64", "I64", "U8", "BF16"]))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


Mutation = Callable[[bytes, np.random.Generator], bytes]


def cases(sandbox: dict[str, Path]) -> list[tuple[str, Path, Mutation]]:
    """(what, file, mutation): the seeded plan of a few hundred damaged inputs."""
    rng = np.random.default_rng(SEED)
    store, run = sandbox["store"], sandbox["run"]
    arrays = sorted(
        p for p in store.rglob("zarr.json") if json.loads(p.read_text())["node_type"] == "array"
    )
    test_rows = open_store(store).select(split="test")  # what the evaluations read
    read_by_proto = [store / "cls" / "layer12" / "c" / str(r) / "0" / "0" / "0" for r in test_rows]
    chunks = [p for p in sorted(store.rglob("*")) if p.is_file() and "/c/" in str(p)]
    plan: list[tuple[str, Path, Mutation]] = []
    plan += [("root zarr.json flip", store / "zarr.json", flip)] * 30
    plan += [("root zarr.json cut", store / "zarr.json", truncate)] * 8
    plan += [
        ("array zarr.json flip", arrays[int(rng.integers(len(arrays)))], flip) for _ in range(20)
    ]
    plan += [
        ("array shape edit", arrays[int(rng.integers(len(arrays)))], edit_shape) for _ in range(20)
    ]
    plan += [("manifest flip", store / "manifest.parquet", flip)] * 35
    plan += [("manifest cut", store / "manifest.parquet", truncate)] * 8
    read = [p for p in read_by_proto if p.is_file()]
    assert len(read) == len(test_rows)
    plan += [("chunk flip", read[int(rng.integers(len(read)))], flip) for _ in range(30)]
    plan += [("chunk cut", read[int(rng.integers(len(read)))], truncate) for _ in range(8)]
    plan += [("any chunk flip", chunks[int(rng.integers(len(chunks)))], flip) for _ in range(10)]
    plan += [("safetensors flip", run / "best.safetensors", flip)] * 35
    plan += [("safetensors cut", run / "best.safetensors", truncate)] * 8
    plan += [("safetensors header edit", run / "best.safetensors", edit_header_shape)] * 12
    with zipfile.ZipFile(sandbox["zip"]) as zf:
        infos = zf.infolist()
    size = sandbox["zip"].stat().st_size
    directory = size - 22 - sum(46 + len(i.filename) for i in infos)
    zip_flip_directory: Mutation = lambda d, r: flip(d, r, directory, len(d))  # noqa: E731
    zip_flip_headers: Mutation = lambda d, r: flip(d, r, 0, directory)  # noqa: E731
    plan += [("zip directory flip", sandbox["zip"], zip_flip_directory)] * 35
    plan += [("zip member flip", sandbox["zip"], zip_flip_headers)] * 15
    plan += [("zip cut", sandbox["zip"], truncate)] * 8
    return plan


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_damaged_inputs_never_give_a_traceback_or_a_result(sandbox: dict[str, Path]) -> None:
    root, store, run, packed = sandbox["root"], sandbox["store"], sandbox["run"], sandbox["zip"]
    code, clean = invoke(cli.eval_app, "--store", store, "--head", "proto", *EVAL)
    assert code == 0 and clean.startswith("accuracy"), clean
    code, clean_run = invoke(cli.eval_app, "--checkpoint", run, "--store", store, *EVAL)
    assert code == 0 and clean_run.startswith("accuracy"), clean_run
    code, clean_zip = invoke(cli.eval_app, "--store", packed, "--head", "proto", *EVAL)
    assert code == 0 and clean_zip == clean
    fingerprint = open_store(store).fingerprint()
    rng = np.random.default_rng(SEED + 1)
    outcomes: dict[str, list[bool]] = {}
    plan = cases(sandbox)
    assert len(plan) >= 250
    for what, target, mutate in plan:
        original = target.read_bytes()
        damaged = mutate(original, rng)
        before = tree(root, skip=root / "unpacked")
        target.write_bytes(damaged)
        ucode = vcode = 0
        try:
            if what.startswith("safetensors"):
                code, out = invoke(cli.eval_app, "--checkpoint", run, "--store", store, *EVAL)
                want = clean_run
            elif what.startswith("zip"):
                code, out = invoke(cli.eval_app, "--store", packed, "--head", "proto", *EVAL)
                want = clean
                unpacked = root / "unpacked"
                ucode, uout = invoke(cli.store_app, "unpack", packed, unpacked)
                assert ucode in (0, 2), (what, uout)
                if ucode == 0:  # all that was unpacked passed verification: the very same store
                    assert open_store(unpacked).fingerprint() == fingerprint, (what, uout)
                else:
                    assert not unpacked.exists(), (what, uout)
                shutil.rmtree(unpacked, ignore_errors=True)
            else:
                code, out = invoke(cli.eval_app, "--store", store, "--head", "proto", *EVAL)
                want = clean
                if what.startswith("any chunk"):
                    vcode, vout = invoke(cli.store_app, "verify", store)
                    assert vcode in (0, 1, 2) and (vcode != 0 or damaged == original), (what, vout)
        finally:
            target.write_bytes(original)
        assert tree(root, skip=root / "unpacked") == before, what  # nothing written anywhere
        if code == 0:
            assert out == want, (what, out)  # unharmed by the damage, or refused
        else:
            lines = out.strip().splitlines()
            assert code == 2 and lines[-1].startswith("error: ") and len(lines) == 1, (what, out)
        refused = code != 0 or (what.startswith("zip") and ucode != 0)
        refused = vcode != 0 if what.startswith("any chunk") else refused
        outcomes.setdefault(what, []).append(refused)
    # the plan really damaged what matters: most cases of every kind are refused
    for what, refusals in outcomes.items():
        assert sum(refusals) >= len(refusals) / 2, (what, refusals)
