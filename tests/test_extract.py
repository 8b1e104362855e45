"""fsar-extract end to end: a real LocalCluster with 2 worker processes on a synthetic dataset with
bad inputs mixed in, a hanging decoder, --splits/--part, SIGKILL of the whole process group and resume.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cluster import ClusterPlan, _start_client, plan_cluster
from pipeline.datasets import list_dataset, select_videos
from pipeline.errors import ExtractError
from pipeline.extract import ExtractOptions, rows_to_extract
from pipeline.synth import make_synthetic_dataset
from store.layout import row_bytes
from tests.bad_videos import EXPECTED_ERRORS, write_bad_videos

TINY = ["--model", "fsar-tiny-vit", "--pretrained", "none"]
HANG = "hang_here"
# Decode timeout of the runs that must finish: the hanging video costs it once per run, and a busy
# CI machine (load 10+ on 2 cores) takes several seconds for a clip that decodes in 0.2 s when idle.
TIMEOUT_S = "15"


def fsar_extract_command() -> list[str]:
    script = Path(sys.executable).with_name("fsar-extract")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from cli import extract_app; extract_app()"]


def run_env(hang: bool = True) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("FSAR_TEST_HANG_DECODE", None)
    if hang:
        env["FSAR_TEST_HANG_DECODE"] = HANG
    return env


def extract_args(data_root: Path, store: Path, *extra: str) -> list[str]:
    """The fsar-extract command line for a subprocess."""
    return [*fsar_extract_command(), *cli_args(data_root, store, *extra)]


def run_extract(data_root: Path, store: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """fsar-extract in a subprocess (with the hanging test video), its output captured."""
    args = extract_args(data_root, store, *extra)
    return subprocess.run(args, env=run_env(), capture_output=True, text=True, timeout=300)


def cli_args(data_root: Path, store: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        "folder",
        "--data-root",
        str(data_root),
        "--store",
        str(store),
        *TINY,
        "--workers",
        "2",
        "--no-progress",
        *extra,
    ]


def manifest(store: Path) -> pd.DataFrame:
    return pd.read_parquet(store / "manifest.parquet")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes x 2 synthetic videos, the 7 bad inputs in one test class, one hanging video."""
    root = tmp_path_factory.mktemp("extract") / "data"
    description = make_synthetic_dataset(root, classes=6, videos_per_class=2, seed=1)
    bad_folder = root / "test" / description["classes"]["test"][0].replace(" ", "_")
    for path in write_bad_videos(root / "bad").values():
        path.rename(bad_folder / path.name)
    shutil.rmtree(root / "bad")
    train_folder = root / "train" / description["classes"]["train"][0].replace(" ", "_")
    good = sorted(train_folder.iterdir())[0]
    shutil.copy(good, train_folder / f"{HANG}{good.suffix}")
    return root


@pytest.fixture(scope="module")
def reference_store(data_root: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One uninterrupted run with a 15 s decode timeout (the hanging video times out)."""
    store = data_root.parent / "reference"
    result = run_extract(data_root, store, "--timeout", TIMEOUT_S)
    return store, result


def expected_error(relpath: str) -> str | None:
    stem = Path(relpath).stem
    if stem == HANG:
        return "timeout"
    return EXPECTED_ERRORS.get(stem)


@pytest.mark.slow
def test_end_to_end_bad_inputs_and_timeout(
    reference_store: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    from store import open_store

    store_path, result = reference_store
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest(store_path)
    assert len(rows) == 20
    for _, row in rows.iterrows():
        want = expected_error(row["relpath"])
        if want is None:
            assert row["status"] == "ok", (row["relpath"], row["error"])
            assert row["decoder"] == "pyav-seek" and row["n_frames"] >= 1  # exact: test_video
            assert len(row["frame_indices"]) == 1 and len(row["frame_indices"][0]) == 8
        else:
            assert (row["status"], row["error"]) == ("failed", want), row["relpath"]
    assert (rows["status"] == "ok").sum() == 13  # 12 synthetic + the 1-frame video
    one_frame = rows[rows["relpath"].str.contains("one_frame")].iloc[0]
    assert list(one_frame["frame_indices"][0]) == [0] * 8
    assert "13 ok, 7 failed of 20 attempted" in result.stdout
    assert "1 x timeout" in result.stdout and "1 x not a video" not in result.stdout
    with open_store(store_path) as store:
        assert store.verify() == []
        text, templates = store.text("emp16")
        assert text.shape == (6, 16, 32) and len(templates) == 16
        assert store.spec["preprocess"]["name"] == "openclip"


@pytest.mark.slow
def test_cached_tokens_equal_a_direct_forward(
    reference_store: tuple[Path, subprocess.CompletedProcess[str]], data_root: Path
) -> None:
    from pipeline.decoding import decode_sampled
    from pipeline.encoder import FrameEncoder
    from pipeline.model import load_clip
    from pipeline.preprocess import build_transform
    from store import open_store

    store_path, _ = reference_store
    with open_store(store_path) as store:
        row = int(store.select(split="val", status="ok")[0])
        entry = store.manifest.iloc[row]
        cached = store.read([row], ["tokens/layer12", "cls/layer04"])
        spec = store.spec
    sampled = decode_sampled(data_root / entry["relpath"], 8, 1, entry["video_id"])
    assert [list(v) for v in entry["frame_indices"]] == sampled.indices
    pixels = build_transform(spec["preprocess"])(sampled.frames[0])
    direct = FrameEncoder(load_clip("fsar-tiny-vit", "none"))(pixels)
    np.testing.assert_allclose(
        cached["tokens/layer12"][0, 0].astype(np.float32),
        direct["tokens/layer12"].astype(np.float32),
        rtol=2e-3,
        atol=2e-3,
    )
    np.testing.assert_allclose(
        cached["cls/layer04"][0, 0].astype(np.float32),
        direct["tokens/layer04"][:, 0].astype(np.float32),
        rtol=2e-3,
        atol=2e-3,
    )


@pytest.mark.slow
def test_splits_part_sigkill_and_resume_equal_an_uninterrupted_run(
    reference_store: tuple[Path, subprocess.CompletedProcess[str]], data_root: Path
) -> None:
    from store import open_store

    reference_path, _ = reference_store
    store = data_root.parent / "resumed"

    # 1. only part 1 of 2 of the train split, decoded sequentially (the reference used seeking)
    first = run_extract(
        data_root, store, "--splits", "train", "--part", "1/2", "--timeout", TIMEOUT_S, "--decode",
        "sequential",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    rows = manifest(store)
    chosen = select_videos(rows, ["train"], (1, 2)).to_numpy()
    assert 0 < chosen.sum() < (rows["split"] == "train").sum()
    assert (rows.loc[chosen, "status"] != "pending").all()
    assert set(rows.loc[chosen & (rows["status"] == "ok"), "decoder"]) == {"pyav-seq"}
    assert (rows.loc[~chosen, "status"] == "pending").all()

    # 2. a full run, killed with its whole process group once it has committed more rows; the
    # hanging video (timeout 120 s) keeps it from finishing first
    ok_before = int((rows["status"] == "ok").sum())
    process = subprocess.Popen(
        extract_args(data_root, store, "--timeout", "120"),
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be killed"
            if (manifest(store)["status"] == "ok").sum() > ok_before:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no progress within 150 s")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed = manifest(store)
    assert (killed["status"] == "pending").any()
    assert (store / "fsar.lock").exists()  # left behind by the killed driver
    gone_by = time.monotonic() + 120  # every process of the group is gone (generous: loaded CI)
    while time.monotonic() < gone_by:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("processes of the killed run survive")

    # 3. rerun: the stale lock is taken over, pending rows are done, ok rows are not redone
    again = run_extract(data_root, store, "--timeout", TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    n_pending_after_kill = int((killed["status"] == "pending").sum())
    assert f"{n_pending_after_kill} videos to extract" in again.stdout
    resumed, reference = manifest(store), manifest(reference_path)
    assert resumed["status"].tolist() == reference["status"].tolist()
    assert resumed["error"].fillna("").tolist() == reference["error"].fillna("").tolist()
    with open_store(store) as resumed_store, open_store(reference_path) as reference_store_:
        assert resumed_store.verify() == []
        ok_rows = resumed_store.select(status="ok")
        names = resumed_store.row_tensors
        ours = resumed_store.read(ok_rows, names)
        theirs = reference_store_.read(ok_rows, names)
    for name in names:
        np.testing.assert_array_equal(ours[name], theirs[name])
    checksum_columns = [c for c in resumed.columns if c.startswith("checksum_")]
    pd.testing.assert_frame_equal(resumed[checksum_columns], reference[checksum_columns])


# ------------------------------------------------------------------ in-process: options and errors


def invoke(args: list[str]) -> object:
    from cli import extract_app

    return CliRunner().invoke(extract_app, args)


@pytest.mark.slow
def test_rerun_of_a_complete_store_does_nothing(
    reference_store: tuple[Path, subprocess.CompletedProcess[str]], data_root: Path
) -> None:
    store_path, _ = reference_store
    before = (store_path / "manifest.parquet").read_bytes()
    result = invoke(cli_args(data_root, store_path))
    assert result.exit_code == 0, result.output
    assert "0 videos to extract (13 already ok)" in result.output
    assert "nothing to extract (13 of 20 selected videos already ok" in result.output
    assert (store_path / "manifest.parquet").read_bytes() == before


@pytest.mark.slow
def test_different_spec_is_refused_naming_the_fields(
    reference_store: tuple[Path, subprocess.CompletedProcess[str]], data_root: Path
) -> None:
    store_path, _ = reference_store
    result = invoke(cli_args(data_root, store_path, "--frames", "4", "--preprocess", "emp"))
    assert result.exit_code == 2
    assert "different spec" in result.output and "frames: 8 != 4" in result.output
    assert "preprocess:" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_text_only_adds_a_template_set(
    reference_store: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    from store import open_store

    store_path, _ = reference_store
    copy = tmp_path / "copy"
    shutil.copytree(store_path, copy)
    templates = tmp_path / "Rich Prompts.txt"
    templates.write_text("# richer prompts\na video of a shape {}\n{}, seen from above\n")
    result = invoke(["--store", str(copy), "--text-only", "--templates", str(templates), *TINY])
    assert result.exit_code == 0, result.output
    assert "text/rich_prompts (6, 2, 32)" in result.output
    with open_store(copy) as store:
        embeddings, names = store.text("rich_prompts")
        assert embeddings.shape == (6, 2, 32) and names[1] == "{}, seen from above"
        assert "text/rich_prompts" in store.tensors
        assert store.verify() == []
    result = invoke(["--store", str(copy), "--text-only", "--templates", str(templates)])
    assert result.exit_code == 0, result.output  # model and weights default to the store's


def test_not_enough_disk_space_is_refused_before_creating_the_store(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.extract

    monkeypatch.setattr(
        pipeline.extract.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 0, 1000)
    )
    store = tmp_path / "store"
    result = invoke(cli_args(data_root, store))
    assert result.exit_code == 2
    assert "not enough disk space" in result.output and "GB free" in result.output
    assert not store.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--part", "3/2"], "--part '3/2'"),
        (["--splits", "train,dev"], "--splits 'train,dev'"),
        (["--timeout", "0"], "--timeout"),
        (["--decode", "fast"], "--decode fast"),
        (["--preprocess", "fancy"], "--preprocess 'fancy'"),
        (["--pretrained", "/nonexistent/weights.pt"], "weights.pt"),
    ],
)
def test_option_errors_exit_2_with_one_line(
    data_root: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    result = invoke(cli_args(data_root, tmp_path / "s", *extra))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 2  # the error (and maybe a weights warning)


def test_missing_layout_and_flag_errors(tmp_path: Path) -> None:
    result = invoke(["--dataset", "hmdb51", "--data-root", str(tmp_path), "--store", "s", *TINY])
    assert result.exit_code == 2 and "no hmdb51 video found" in result.output
    result = invoke(["--store", "s", "--text-only"])
    assert result.exit_code == 2 and "--text-only goes with --templates" in result.output
    result = invoke(["--store", "s"])
    assert result.exit_code == 2 and "--dataset and --data-root are required" in result.output


@pytest.mark.slow
def test_batching_frames_across_videos_matches_one_forward_per_video(
    reference_store: tuple[Path, subprocess.CompletedProcess[str]], data_root: Path, tmp_path: Path
) -> None:
    """The CUDA path (several videos per forward, split back per row), run on CPU."""
    from pipeline.decode_child import DecodeRequest, close_decoders
    from pipeline.tasks import EncoderConfig, decode_task, encode_task
    from store import open_store

    store_path, _ = reference_store
    copy = tmp_path / "copy"
    shutil.copytree(store_path, copy)
    with open_store(copy) as store:
        rows = [int(r) for r in store.select(status="ok")[:3]]
        entries = store.manifest.iloc[rows]
        spec = store.spec
        before = store.read(rows, ["tokens/layer08", "cls/layer12"])
    config = EncoderConfig(
        model="fsar-tiny-vit",
        pretrained="none",
        weights_sha256=spec["weights_sha256"],
        recipe="emp",
        layers=tuple(spec["layers"]),
        device="cpu",
        precision="fp32",
        torch_threads=1,
        batch_frames=12,  # 3 videos x 8 frames -> forwards of 12, 12 frames across video borders
        batch_across_videos=True,
    )
    try:
        outcomes = [
            decode_task(
                DecodeRequest(str(data_root / e.relpath), e.video_id, 8, 1),
                spec["preprocess"],
                config,
                60.0,
            )
            for e in entries.itertuples()
        ]
    finally:
        close_decoders()
    missing = DecodeRequest(str(data_root / "nowhere.mp4"), "x", 8, 1)
    outcomes.append(decode_task(missing, spec["preprocess"], config, 60.0))
    updates = encode_task([*rows, 0], outcomes, config, str(copy))
    assert [u["status"] for u in updates] == ["failed", "ok", "ok", "ok"]
    assert updates[0]["error"] == "missing" and updates[0]["row"] == 0
    for update, (_, entry) in zip(updates[1:], entries.iterrows(), strict=True):
        assert update["frame_indices"] == [list(v) for v in entry["frame_indices"]]
    with open_store(copy) as store:
        after = store.read(rows, ["tokens/layer08", "cls/layer12"])
    for name in after:
        np.testing.assert_allclose(
            after[name].astype(np.float32), before[name].astype(np.float32), rtol=2e-3, atol=2e-3
        )


def test_cpu_decode_task_preprocesses_on_one_torch_thread(data_root: Path) -> None:
    """On CPU the other task thread's forward holds the cores: preprocessing must not add a team."""
    import threading

    import torch

    from pipeline.decode_child import DecodeRequest, close_decoders
    from pipeline.preprocess import preprocess_spec
    from pipeline.tasks import EncoderConfig, decode_task

    video = sorted((data_root / "train").rglob("*.mp4"))[0]
    config = EncoderConfig(
        "fsar-tiny-vit", "none", "", "emp", (4, 8, 12), "cpu", "fp32", 2, 8, False
    )
    spec = preprocess_spec("openclip", {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3})
    seen: dict[str, object] = {}

    def run() -> None:
        torch.set_num_threads(2)
        seen["outcome"] = decode_task(DecodeRequest(str(video), "v", 8, 1), spec, config, 60.0)
        seen["threads"] = torch.get_num_threads()

    try:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(120)
    finally:
        close_decoders()
    assert seen["threads"] == 1
    assert seen["outcome"].error is None and seen["outcome"].pixels.shape == (1, 8, 3, 64, 64)


# ------------------------------------------------------------------ in-process: planning helpers


def test_cluster_plan_keeps_torch_threads_times_workers_within_cores() -> None:
    assert plan_cluster("cpu", None, cores=16) == ClusterPlan(4, 2, 4)
    assert plan_cluster("cpu", None, cores=2) == ClusterPlan(1, 2, 2)
    assert plan_cluster("cpu", 2, cores=2) == ClusterPlan(2, 2, 1)
    assert plan_cluster("cpu", 3, cores=16) == ClusterPlan(3, 2, 5)
    with pytest.raises(ExtractError, match="at most 2"):
        plan_cluster("cpu", 3, cores=2)


def _reallocation_faults() -> dict[str, object]:
    """In a worker task: page faults of each of 30 rounds of allocating and freeing 16 MiB.

    16 MiB is the size of the largest ViT-B/16 activations of an 8-frame forward. Aligned blocks
    fragment the heap for a few rounds before freed ones are reused, hence the minimum below."""
    import resource

    import dask
    import torch

    rounds = []
    for _ in range(30):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(16 << 20, dtype=torch.uint8)  # as the encoder's activations are
        del block
        rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {
        "faults": rounds,
        "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "profile": dask.config.get("distributed.worker.profile.enabled"),
    }


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_local_cluster_workers_reuse_freed_memory_and_skip_the_profiler(tmp_path: Path) -> None:
    # Dask's default worker environment makes every large block a fresh mmap: each 16 MiB round is
    # 4,096 page faults. Our workers keep freed memory, so repeats cost (almost) none.
    options = ExtractOptions("folder", str(tmp_path), str(tmp_path / "store"))
    client, cluster = _start_client(options, ClusterPlan(1, 1, 1))
    try:
        report = client.submit(_reallocation_faults, pure=False).result()
    finally:
        client.close()
        cluster.close()
    assert report["trim"] == str(1 << 30)
    assert report["profile"] is False
    assert min(report["faults"]) < 1000, report


def test_rows_to_extract_and_row_bytes(data_root: Path) -> None:
    videos = list_dataset("folder", data_root).videos.copy()
    videos.loc[0, "status"] = "ok"
    videos.loc[1, ["status", "error"]] = ["failed", "truncated"]
    selected, todo = rows_to_extract(videos, None, None, retry_failed=False)
    assert selected.all() and 0 not in todo and 1 not in todo and len(todo) == 18
    _, todo = rows_to_extract(videos, None, None, retry_failed=True)
    assert 1 in todo and 0 not in todo
    selected, todo = rows_to_extract(videos, ["val"], None, retry_failed=True)
    assert set(todo) == set(np.flatnonzero((videos["split"] == "val").to_numpy()))
    spec = {"tensors": [{"shape_per_row": [1, 8, 17, 32], "dtype": "float16"}]}
    assert row_bytes(spec) == 8 * 17 * 32 * 2


def test_documented_worker_command_gives_the_local_cluster_settings() -> None:
    # docs/extraction.md gives teams the `dask worker` command for --scheduler: it must set what
    # the local cluster's workers get (the environment as the nanny reads it, no profiler)
    import re

    import dask.config

    from pipeline.cluster import LOCAL_WORKER_CONFIG, WORKER_ENVIRON

    doc = (Path(__file__).parents[1] / "docs" / "extraction.md").read_text()
    block = doc[doc.index("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED") :]
    block = block[: block.index("dask worker")]
    env = dict(re.findall(r"(DASK_\w+)=('[^']*'|\S+)", block))
    parsed = dask.config.collect_env({k: v.strip("'") for k, v in env.items()})
    assert dask.config.get("distributed.worker.profile.enabled", config=parsed) is False
    assert dask.config.get("distributed.nanny.pre-spawn-environ", config=parsed) == WORKER_ENVIRON
    assert LOCAL_WORKER_CONFIG["distributed.nanny.pre-spawn-environ"] == WORKER_ENVIRON
