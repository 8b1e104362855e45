"""Frame sampling, exact sequential and seek decoding, failure reasons, the decode child, preprocessing."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from bench.decode_fps import decode_fps
from pipeline.decode_child import DecodeRequest, DecoderProcess, decode_request
from pipeline.decoding import (
    DECODER_NAME,
    HANG_ENV,
    HANG_MARKER_ENV,
    SEEK_DECODER_NAME,
    container_is_cut_short,
    decode_sampled,
)
from pipeline.hashing import in_part, stable_hash
from pipeline.preprocess import CLIP_MEAN, CLIP_STD, build_transform, preprocess_spec
from pipeline.sampling import sample_frame_indices
from pipeline.seeking import NotExact, PacketIndex, decode_frames, index_packets
from pipeline.synth import write_video
from tests.bad_videos import EXPECTED_ERRORS, moving_square_frames, write_bad_videos


def reference_frames(path: Path) -> list[np.ndarray]:
    """Every frame, decoded sequentially with PyAV (the reference for exactness)."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


AV_PICTURE_TYPE_B = 3  # FFmpeg's enum value for B-frames


def picture_types(path: Path) -> set[int]:
    with av.open(str(path)) as container:
        return {int(frame.pict_type) for frame in container.decode(video=0)}


# ----------------------------------------------------------------------------------- sampling


def test_stable_hash_is_fixed_across_runs_and_machines() -> None:
    assert stable_hash("videos/brush_hair/x") == 9066409205296331559
    parts = [sum(in_part(f"video{i}", p, 4) for i in range(400)) for p in (1, 2, 3, 4)]
    assert sum(parts) == 400 and min(parts) > 60


def test_view0_takes_segment_centres() -> None:
    assert sample_frame_indices(100, 8, 1, "any") == [[6, 18, 31, 43, 56, 68, 81, 93]]
    assert sample_frame_indices(8, 8, 1, "any") == [list(range(8))]


def test_random_views_stay_in_their_segments_and_are_seeded_by_video_id() -> None:
    views = sample_frame_indices(100, 8, 3, "videos/brush_hair/x")
    assert views[1:] == [
        [9, 13, 26, 39, 52, 68, 73, 85],
        [5, 16, 26, 36, 49, 69, 79, 86],
    ]
    for view in views[1:]:  # released segments: 100 // 8 = 12 frames from frame 0, 96..99 unused
        for segment, index in enumerate(view):
            assert 12 * segment <= index < 12 * (segment + 1)
    assert sample_frame_indices(100, 8, 3, "videos/brush_hair/x") == views
    assert sample_frame_indices(100, 8, 3, "videos/brush_hair/y")[1:] != views[1:]


def test_short_videos_repeat_frames_in_order() -> None:
    for view in sample_frame_indices(3, 8, 2, "short"):
        assert view == sorted(view) and set(view) == {0, 1, 2}
    assert sample_frame_indices(1, 8, 2, "one") == [[0] * 8, [0] * 8]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 8, 1, "none")


# ----------------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module")
def encoded_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("encoded")
    frames = moving_square_frames(57)
    paths = {}
    for kind, fps in (("avi", 25), ("mp4", 30), ("webm", 24)):
        paths[kind] = folder / f"clip.{kind}"
        write_video(paths[kind], frames, fps)
    return paths


def test_generated_avi_is_mpeg4_part2_with_b_frames(encoded_videos: dict[str, Path]) -> None:
    with av.open(str(encoded_videos["avi"])) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"
    assert AV_PICTURE_TYPE_B in picture_types(encoded_videos["avi"])


@pytest.mark.parametrize("kind", ["avi", "mp4", "webm"])
def test_sampled_frames_equal_sequential_pyav_decode(
    encoded_videos: dict[str, Path], kind: str
) -> None:
    reference = reference_frames(encoded_videos[kind])
    assert len(reference) == 57
    sampled = decode_sampled(encoded_videos[kind], 8, 3, f"clip-{kind}")
    assert sampled.n_frames == 57 and sampled.declared_frames == 57
    assert sampled.frames.shape == (3, 8, 72, 96, 3)
    assert sampled.indices == sample_frame_indices(57, 8, 3, f"clip-{kind}")
    for view, indices in enumerate(sampled.indices):
        for slot, index in enumerate(indices):
            np.testing.assert_array_equal(sampled.frames[view, slot], reference[index])
    # consecutive frames differ, so a frame off by one would have been caught above
    assert not np.array_equal(reference[10], reference[11])


def test_one_view_of_the_b_frame_avi_equals_sequential_pyav_decode(
    encoded_videos: dict[str, Path],
) -> None:
    """The indices at which decord's seeking returns other frames on this AVI (python -m
    bench.decord_evidence prints them): fsar's decoding returns the right ones."""
    reference = reference_frames(encoded_videos["avi"])
    indices = sample_frame_indices(57, 8, 1, "clip-avi")[0]
    sampled = decode_sampled(encoded_videos["avi"], 8, 1, "clip-avi")
    for slot, index in enumerate(indices):
        np.testing.assert_array_equal(sampled.frames[0, slot], reference[index])


def test_decode_fps_measures_sequential_decoding_in_a_child(
    encoded_videos: dict[str, Path],
) -> None:
    result = decode_fps(encoded_videos["mp4"], "pyav", repeats=1)
    assert result["frames"] == 57 and result["fps_per_core"] > 0 and result["fps_wall"] > 0
    with pytest.raises(ValueError):
        decode_fps(encoded_videos["mp4"], "opencv")


def test_second_decoding_pass_when_frames_exceed_the_memory_budget(
    encoded_videos: dict[str, Path],
) -> None:
    reference = reference_frames(encoded_videos["avi"])
    sampled = decode_sampled(encoded_videos["avi"], 8, 2, "budget", keep_bytes=0)
    for view, indices in enumerate(sampled.indices):
        for slot, index in enumerate(indices):
            np.testing.assert_array_equal(sampled.frames[view, slot], reference[index])


# ----------------------------------------------------------------------------------- seek path


@pytest.fixture(scope="module")
def gop_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    """Each container with keyframes every 4 frames and with one keyframe interval over 57 frames."""
    folder = tmp_path_factory.mktemp("gop")
    frames = moving_square_frames(57)
    paths = {}
    for kind in ("avi", "mp4", "webm"):
        for gop in (4, 300):
            paths[kind, gop] = folder / f"gop{gop}.{kind}"
            write_video(paths[kind, gop], frames, 25, gop=gop)
    return paths


def seek_decode(path: Path, wanted: list[int]) -> tuple[dict[int, np.ndarray], int, PacketIndex]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        index = index_packets(container, stream, int(stream.frames or 0))
        kept, decoded = decode_frames(stream.codec_context, index, wanted)
        return {i: f.to_ndarray(format="rgb24") for i, f in kept.items()}, decoded, index


INDEX_PATTERNS = {
    "first": [0],
    "last": [56],
    "first and last": [0, 56],
    "repeated": [3, 3, 3, 40, 40],
    "adjacent at the end": [55, 56],
    "every frame": list(range(57)),
    "every 7th, unsorted": list(range(56, -1, -7)),
    "one view": sample_frame_indices(57, 8, 1, "v")[0],
    "three views": [i for view in sample_frame_indices(57, 8, 3, "v") for i in view],
    "random": np.random.default_rng(0).integers(0, 57, 12).tolist(),
}


@pytest.mark.parametrize("kind", ["avi", "mp4", "webm"])
@pytest.mark.parametrize("gop", [4, 300])
def test_seek_path_returns_the_sequential_frames(
    gop_videos: dict[tuple[str, int], Path], kind: str, gop: int
) -> None:
    path = gop_videos[kind, gop]
    reference = reference_frames(path)
    assert len(reference) == 57
    for name, wanted in INDEX_PATTERNS.items():
        kept, decoded, index = seek_decode(path, wanted)
        assert index.n_frames == 57 and sorted(kept) == sorted(set(wanted)), name
        for i in wanted:
            np.testing.assert_array_equal(kept[i], reference[i], err_msg=f"{name}: frame {i}")
        assert decoded >= len(set(wanted))
    keys = len(seek_decode(path, [0])[2].key_positions)
    if gop == 4:  # many keyframes: the last frame alone needs only its own group of pictures
        assert keys > 10 and seek_decode(path, [56])[1] <= 8
    else:
        assert keys <= 3
    assert (
        seek_decode(path, [0])[1] <= 4
    )  # no decoding past the wanted frame (and the reorder delay)


@pytest.mark.parametrize("kind", ["avi", "mp4", "webm"])
def test_seek_mode_equals_sequential_mode(
    gop_videos: dict[tuple[str, int], Path], encoded_videos: dict[str, Path], kind: str
) -> None:
    for path in (gop_videos[kind, 4], gop_videos[kind, 300], encoded_videos[kind]):
        seek = decode_sampled(path, 8, 3, f"seek-{kind}")
        sequential = decode_sampled(path, 8, 3, f"seek-{kind}", mode="sequential")
        assert (seek.decoder, sequential.decoder) == (SEEK_DECODER_NAME, DECODER_NAME)
        assert (seek.n_frames, seek.declared_frames, seek.fps, seek.indices) == (
            sequential.n_frames,
            sequential.declared_frames,
            sequential.fps,
            sequential.indices,
        )
        np.testing.assert_array_equal(seek.frames, sequential.frames)
        assert sequential.frames_decoded == 57 and seek.frames_decoded < 57
    with pytest.raises(ValueError, match="decode mode"):
        decode_sampled(encoded_videos[kind], 8, 1, "x", mode="fast")


def test_seek_path_refuses_what_it_cannot_prove(
    gop_videos: dict[tuple[str, int], Path], tmp_path: Path
) -> None:
    path = gop_videos["mp4", 4]
    with av.open(str(path)) as container:  # the container's frame count must match the packets
        with pytest.raises(NotExact, match="58 frames declared"):
            index_packets(container, container.streams.video[0], 58)
    with av.open(str(path)) as container:  # a frame the decoder gives that the index lacks
        stream = container.streams.video[0]
        index = index_packets(container, stream, 57)
        index.display_pts.remove(index.packets[5].pts)
        with pytest.raises(NotExact, match="did not come out next"):
            decode_frames(stream.codec_context, index, list(range(56)))
    # a raw H.264 stream has no pts: the seek mode falls back to the sequential decode
    raw = tmp_path / "raw.h264"
    with av.open(str(raw), mode="w", format="h264") as output:
        stream = output.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 72, "yuv420p"
        for frame in moving_square_frames(30):
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode())
    with av.open(str(raw)) as container:
        with pytest.raises(NotExact, match="without pts"):
            index_packets(container, container.streams.video[0], 0)
    fallback = decode_sampled(raw, 8, 2, "raw")
    assert fallback.decoder == DECODER_NAME and fallback.n_frames == 30
    reference = reference_frames(raw)
    for view, indices in enumerate(fallback.indices):
        for slot, i in enumerate(indices):
            np.testing.assert_array_equal(fallback.frames[view, slot], reference[i])


@pytest.fixture(scope="module")
def decoder() -> Iterator[DecoderProcess]:
    """One decode child for the module; it hangs on paths containing `hang_here` (test hook)."""
    previous = os.environ.get(HANG_ENV)
    os.environ[HANG_ENV] = "hang_here"
    process = DecoderProcess()
    yield process
    process.close()
    if previous is None:
        del os.environ[HANG_ENV]
    else:
        os.environ[HANG_ENV] = previous


def test_decoder_child_returns_the_same_frames(
    encoded_videos: dict[str, Path], decoder: DecoderProcess
) -> None:
    outcome = decoder.decode(DecodeRequest(str(encoded_videos["webm"]), "w", 4, 2), timeout=60)
    assert outcome.error is None and outcome.decoder == SEEK_DECODER_NAME and outcome.fps == 24.0
    assert outcome.n_frames == 57 and outcome.indices == sample_frame_indices(57, 4, 2, "w")
    direct = decode_sampled(encoded_videos["webm"], 4, 2, "w", mode="sequential")
    np.testing.assert_array_equal(outcome.pixels, direct.frames)
    assert outcome.pixels.flags.writeable
    request = DecodeRequest(str(encoded_videos["webm"]), "w", 4, 2, decode="sequential")
    sequential = decoder.decode(request, timeout=60)
    assert sequential.decoder == DECODER_NAME
    np.testing.assert_array_equal(sequential.pixels, direct.frames)
    bad = decoder.decode(DecodeRequest(str(encoded_videos["webm"]) + ".gone", "x", 4, 2), 60)
    assert bad.error == "missing" and bad.pixels is None


# ----------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_bad_videos(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("stem", sorted(EXPECTED_ERRORS))
def test_bad_inputs_fail_with_a_short_reason(bad_videos: dict[str, Path], stem: str) -> None:
    outcome = decode_request(DecodeRequest(str(bad_videos[stem]), stem, 8, 2))
    assert outcome.error == EXPECTED_ERRORS[stem]
    if stem == "one_frame":  # documented: a 1-frame video is ok, its frame repeated T times
        assert outcome.n_frames == 1 and outcome.indices == [[0] * 8, [0] * 8]
        assert outcome.pixels.shape == (2, 8, 72, 96, 3)


def test_missing_file(tmp_path: Path) -> None:
    assert decode_request(DecodeRequest(str(tmp_path / "gone.avi"), "g", 8, 1)).error == "missing"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permission bits")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.mp4"
    write_video(path, moving_square_frames(5), 25)
    path.chmod(0)
    assert decode_request(DecodeRequest(str(path), "l", 8, 1)).error == "unreadable"


@pytest.mark.parametrize("kind", ["avi", "mp4", "webm"])
def test_cut_files_are_truncated(
    encoded_videos: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    data = encoded_videos[kind].read_bytes()
    assert not container_is_cut_short(encoded_videos[kind])
    for fraction in (0.2, 0.6):
        cut = tmp_path / f"cut{fraction}.{kind}"
        cut.write_bytes(data[: int(len(data) * fraction)])
        assert container_is_cut_short(cut)
        assert decode_request(DecodeRequest(str(cut), "c", 8, 1)).error == "truncated"


def test_hanging_decode_times_out_and_the_child_restarts(
    encoded_videos: dict[str, Path], tmp_path: Path, decoder: DecoderProcess
) -> None:
    hanging = tmp_path / "hang_here.avi"
    hanging.write_bytes(encoded_videos["avi"].read_bytes())
    assert decoder.decode(DecodeRequest(str(encoded_videos["avi"]), "a", 2, 1), 60).error is None
    started = time.monotonic()
    outcome = decoder.decode(DecodeRequest(str(hanging), "h", 2, 1), timeout=1.5)
    assert outcome.error == "timeout"
    assert 1.4 < time.monotonic() - started < 120  # killed and restarted (loaded machines are slow)
    after = decoder.decode(DecodeRequest(str(encoded_videos["avi"]), "a", 2, 1), 60)
    assert after.error is None and after.pixels.shape == (1, 2, 72, 96, 3)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_decode_child_dies_with_its_parent(tmp_path: Path) -> None:
    """A child stuck on a video (test hook) must not outlive a worker that was killed."""
    import subprocess
    import sys

    stuck = tmp_path / "hang_here.mp4"
    stuck.write_bytes(b"not read: the hook hangs first")
    script = (
        "import os, sys, time\n"
        "from pipeline.decode_child import DecodeRequest, DecoderProcess\n"
        "decoder = DecoderProcess()\n"
        "decoder._start()\n"
        "print(decoder._proc.pid, flush=True)\n"
        "request = DecodeRequest(sys.argv[1], 'stuck', 8, 1)\n"
        "decoder._proc.stdin.write((__import__('json').dumps(request.__dict__) + '\\n').encode())\n"
        "decoder._proc.stdin.flush()\n"
        "while not os.path.exists(sys.argv[2]):  # the child is stuck in the video\n"
        "    time.sleep(0.05)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    marker = tmp_path / "stuck"
    env = dict(os.environ, **{HANG_ENV: "hang_here", HANG_MARKER_ENV: str(marker)})
    result = subprocess.run(
        [sys.executable, "-c", script, str(stuck), str(marker)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    child = int(result.stdout.split()[0])
    assert marker.exists()
    deadline = time.monotonic() + 120  # generous: the machine may be loaded
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)


# ----------------------------------------------------------------------------------- preprocessing


def test_openclip_preprocess_is_exactly_open_clips_transform() -> None:
    import open_clip
    import torch
    from PIL import Image

    from pipeline.model import TINY_MODEL, load_clip

    clip = load_clip(TINY_MODEL, "none")
    spec = preprocess_spec("openclip", clip.preprocess.as_dict())
    assert spec["crop"] == 64 and spec["interpolation"] == "bicubic"
    _, _, reference = open_clip.create_model_and_transforms(TINY_MODEL, pretrained=None)
    ours = build_transform(spec)
    rng = np.random.default_rng(0)
    for height, width in ((72, 96), (240, 320), (64, 64), (300, 180)):
        frames = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        expected = torch.stack([reference(Image.fromarray(f)) for f in frames]).numpy()
        np.testing.assert_array_equal(ours(frames), expected)


def test_emp_preprocess_squashes_to_256_then_centre_crops() -> None:
    spec = preprocess_spec("emp", {"size": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    assert (spec["resize"], spec["crop"], spec["mean"]) == (256, 224, list(CLIP_MEAN))
    assert spec["resize_mode"] == "squash"
    transform = build_transform(spec)
    flat = np.full((1, 240, 320, 3), 200, dtype=np.uint8)
    out = transform(flat)
    assert out.shape == (1, 3, 224, 224) and out.dtype == np.float32
    expected = (200 / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out[0, :, 100, 100], expected, rtol=1e-6)
    # 240x320 -> 256x256 (aspect ratio ignored), crop from column 16: a bar over the left 80 of
    # 320 columns covers 64 resized columns, 48 of them in the crop (keeping the aspect ratio,
    # 256x341 cropped from column 58, would leave 2)
    bar = np.zeros((1, 240, 320, 3), dtype=np.uint8)
    bar[:, :, :80] = 255
    bright = transform(bar)[0, 0, 120] > 0
    assert bright[:47].all() and not bright[49:].any()
