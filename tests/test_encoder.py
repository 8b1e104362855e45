"""pipeline.encoder: cached tensors vs direct open_clip forwards, loading rules and fast failures."""

from __future__ import annotations

import hashlib
import os
import pathlib
import time

import numpy as np
import open_clip
import pytest
import torch

from pipeline.encoder import FrameEncoder, export_last_block, tensor_names
from pipeline.errors import EncoderError, PretrainedUnavailable, UnsupportedModel, WeightsFileError
from pipeline.model import TINY_MODEL, default_layers, load_clip

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return load_clip(TINY_MODEL, "none")


def frames(n: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def f16(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float16).float().numpy()


def assert_fp16_close(a: np.ndarray, b: np.ndarray, rel: float = 2e-3) -> None:
    """Equal up to fp16 rounding: errors within a few fp16 ulps of the tensor's scale."""
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    scale = max(float(np.abs(b32).max()), 1e-6)
    np.testing.assert_allclose(a32, b32, rtol=rel, atol=rel * scale)


def test_tiny_geometry(tiny):
    f = tiny.spec_fields()
    assert f["model"] == TINY_MODEL and f["pretrained"] == "none"
    assert (f["layers"], f["tokens"], f["dim"], f["width"], f["patch_grid"]) == (
        [4, 8, 12],
        17,
        32,
        64,
        [4, 4],
    )
    assert f["image_size"] == 64 and tiny.preprocess.image_size == (64, 64)
    assert len(f["weights_sha256"]) == 64
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert not tiny.model.training


def test_tokens_equal_open_clip_forward_intermediates(tiny):
    x = frames(5)
    out = FrameEncoder(tiny, recipe="emp")(x)
    assert list(out) == ["tokens/layer04", "tokens/layer08", "tokens/layer12"]
    v = tiny.model.visual
    with torch.no_grad():
        ref = v.forward_intermediates(
            x,
            indices=[3, 7, 11],
            normalize_intermediates=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
    for i, name in enumerate(out):
        assert out[name].dtype == np.float16 and out[name].shape == (5, 17, 32)
        full = torch.cat(
            [ref["image_intermediates_prefix"][i], ref["image_intermediates"][i]], dim=1
        )
        assert_fp16_close(out[name], f16(full @ v.proj))


def test_layer12_cls_equals_encode_image(tiny):
    x = frames(4, seed=1)
    out = FrameEncoder(tiny)(x)
    with torch.no_grad():
        ref = tiny.model.encode_image(x)
    assert_fp16_close(out["tokens/layer12"][:, 0], f16(ref))
    # and the fp32 path is exact up to float32 noise
    full = FrameEncoder(tiny).encode_torch(x)["tokens/layer12"][:, 0]
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)


def test_layer_in_is_the_last_block_input(tiny):
    x = frames(3, seed=2)
    enc = FrameEncoder(tiny, recipe="emp+last")
    assert enc.names[-1] == "tokens/layer12_in"
    t = enc.encode_torch(x)
    assert t["tokens/layer12_in"].shape == (3, 17, 64)
    v = tiny.model.visual
    with torch.no_grad():
        y = v.ln_post(v.transformer.resblocks[-1](t["tokens/layer12_in"])) @ v.proj
    torch.testing.assert_close(y, t["tokens/layer12"], rtol=1e-5, atol=1e-5)


def test_batch_composition_independence(tiny):
    enc = FrameEncoder(tiny, recipe="emp+last")
    video = frames(8, seed=3)
    alone = enc(video)
    others = frames(11, seed=4)
    mixed = torch.cat([others[:5], video, others[5:]])
    together = enc(mixed)
    for name in enc.names:
        assert_fp16_close(together[name][5:13], alone[name])
    for name in enc.names:  # a different batch size and position
        assert_fp16_close(enc(torch.cat([video[4:], others[:1]]))[name][:4], alone[name][4:])


def test_concurrent_calls_from_threads(tiny):
    from concurrent.futures import ThreadPoolExecutor

    enc = FrameEncoder(tiny, recipe="emp+last")
    inputs = [frames(3, seed=20 + i) for i in range(6)]
    expected = [enc(x) for x in inputs]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(enc, inputs))
    for e, g in zip(expected, got, strict=True):
        for name in enc.names:
            assert_fp16_close(g[name], e[name])


def test_numpy_input_and_shape_check(tiny):
    enc = FrameEncoder(tiny)
    x = frames(2, seed=5)
    a = enc(x.numpy())
    b = enc(x)
    np.testing.assert_array_equal(a["tokens/layer08"], b["tokens/layer08"])
    with pytest.raises(EncoderError, match=r"frames must be \(B, 3, 64, 64\)"):
        enc(torch.zeros(2, 3, 32, 32))


def test_layers_and_names():
    assert default_layers(12) == [4, 8, 12]
    assert default_layers(24) == [8, 16, 24]
    assert default_layers(32) == [11, 21, 32]
    assert tensor_names("emp", [8, 16, 24]) == [
        "tokens/layer08",
        "tokens/layer16",
        "tokens/layer24",
    ]
    assert tensor_names("emp+last", [4, 8, 12])[-1] == "tokens/layer12_in"
    with pytest.raises(EncoderError, match="unknown recipe"):
        tensor_names("full", [4, 8, 12])


def test_custom_layers(tiny):
    out = FrameEncoder(tiny, layers=[2, 6, 9])(frames(2, seed=6))
    assert list(out) == ["tokens/layer02", "tokens/layer06", "tokens/layer09"]
    with pytest.raises(EncoderError, match="emp\\+last needs the last cached layer"):
        FrameEncoder(tiny, recipe="emp+last", layers=[2, 6, 9])
    with pytest.raises(EncoderError, match="must be increasing"):
        FrameEncoder(tiny, layers=[8, 4, 12])


def test_none_is_deterministic_and_warns(tiny, capsys):
    again = load_clip(TINY_MODEL, "none")
    assert again.weights_sha256 == tiny.weights_sha256
    assert "random weights" in capsys.readouterr().err
    for (k, a), b in zip(
        tiny.model.state_dict().items(), again.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), k


def test_local_files_load_with_file_sha(tiny, tmp_path):
    # a distinct state: perturb the random init so a silent fallback to `none` would be caught
    state = {
        k: v.clone() + 0.01 if v.is_floating_point() else v.clone()
        for k, v in tiny.model.state_dict().items()
    }
    state.pop("attn_mask", None)
    pt = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, pt)
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    for path in (pt, st):
        c = load_clip(TINY_MODEL, str(path))
        assert c.pretrained == f"file:{path.name}"
        assert c.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        torch.testing.assert_close(c.model.visual.proj, state["visual.proj"], rtol=0, atol=0)


def test_missing_tag_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.monotonic()
    with pytest.raises(PretrainedUnavailable) as err:
        load_clip("ViT-B-16", "openai", cache_dir=str(tmp_path / "cache"))
    assert time.monotonic() - t0 < 20
    msg = str(err.value)
    assert "\n" not in msg
    assert "HF_HUB_OFFLINE" in msg and "--pretrained /path/to/ViT-B-16.pt" in msg
    assert "Hugging Face cache" in msg


def test_unknown_tag_and_model(tmp_path):
    with pytest.raises(
        PretrainedUnavailable, match=r"unknown pretrained 'no-such-tag'.*available: .*openai"
    ):
        load_clip("ViT-B-16", "no-such-tag")
    with pytest.raises(UnsupportedModel, match=r"unknown open_clip model 'ViT-B-61'.*did you mean"):
        load_clip("ViT-B-61", "none")


def test_bad_weights_files_fail_fast(tiny, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    text = tmp_path / "weights.safetensors"
    text.write_text("not really")
    t0 = time.monotonic()
    for path, pattern in [
        (junk, r"cannot read weights file junk\.pt"),
        (text, r"cannot read weights file weights\.safetensors"),
        (tmp_path / "absent.pt", r"weights file not found"),
    ]:
        with pytest.raises(WeightsFileError, match=pattern) as err:
            load_clip(TINY_MODEL, str(path))
        assert "\n" not in str(err.value)
    assert time.monotonic() - t0 < 20


class Gadget:  # an arbitrary object: weights_only loading must refuse to unpickle it
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    torch.save({"visual.proj": torch.zeros(2), "x": Gadget()}, p)
    with pytest.raises(WeightsFileError, match="cannot read weights file evil.pt"):
        load_clip(TINY_MODEL, str(p))
    assert "unpickled!" not in capsys.readouterr().out


def test_wrong_architecture_file(tiny, tmp_path):
    state = dict(tiny.model.state_dict())
    state["visual.proj"] = torch.zeros(64, 48)
    del state["visual.ln_post.bias"]
    state["extra.weight"] = torch.zeros(1)
    p = tmp_path / "other.pt"
    torch.save(state, p)
    with pytest.raises(WeightsFileError) as err:
        load_clip(TINY_MODEL, str(p))
    msg = str(err.value)
    assert msg.startswith(f"weights file other.pt does not fit {TINY_MODEL}:")
    assert (
        "1 missing (e.g. visual.ln_post.bias)" in msg and "1 unexpected (e.g. extra.weight)" in msg
    )
    assert "visual.proj: file [64, 48] vs model [64, 32]" in msg and "\n" not in msg


def test_vit_b16_default_geometry_and_tiny_file_mismatch(tiny, tmp_path):
    c = load_clip("ViT-B-16", "none")
    f = c.spec_fields()
    assert (f["layers"], f["tokens"], f["dim"], f["width"], f["patch_grid"]) == (
        [4, 8, 12],
        197,
        512,
        768,
        [14, 14],
    )
    _, cfg = export_last_block(c.model)
    assert cfg == {
        "width": 768,
        "heads": 12,
        "mlp_ratio": 4.0,
        "act": "gelu",
        "ln_eps": 1e-5,
        "layer_scale": False,
        "dim": 512,
    }
    out = FrameEncoder(c, recipe="emp+last")(frames(1, size=224))
    assert out["tokens/layer04"].shape == (1, 197, 512) and out["tokens/layer12_in"].shape == (
        1,
        197,
        768,
    )
    del c
    p = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), p)
    with pytest.raises(WeightsFileError, match=r"does not fit ViT-B-16: .*shape mismatches"):
        load_clip("ViT-B-16", str(p))


def test_openai_tag_config_means_quick_gelu():
    # what load_clip reads for the default tag: OpenAI weights need QuickGELU on the plain ViT-B-16 config
    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai").get("quick_gelu") is True
    assert not open_clip.get_model_config("ViT-B-16").get("quick_gelu", False)


def test_quick_gelu_option(tmp_path):
    c = load_clip(TINY_MODEL, "none", quick_gelu=True)
    assert export_last_block(c.model)[1]["act"] == "quick_gelu"


def test_torchscript_archive_loads_only_when_allowed(tiny, tmp_path, monkeypatch):
    """TorchScript runs code at load (`__setstate__`): only behind allow_torchscript, or for the
    archive OpenAI published for the model (its sha256 is in the tag's URL)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        archive = tmp_path / "tiny-jit.pt"
        torch.jit.save(torch.jit.script(tiny.model), str(archive))
    real_load = torch.jit.load
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a) or real_load(*a, **k))
    with pytest.raises(WeightsFileError, match="TorchScript archive, which runs code when loaded"):
        load_clip(TINY_MODEL, str(archive))
    assert calls == []  # refused before anything of it ran
    c = load_clip(TINY_MODEL, str(archive), allow_torchscript=True)
    assert c.weights_sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    torch.testing.assert_close(c.model.visual.proj, tiny.model.visual.proj, rtol=0, atol=0)
    assert export_last_block(c.model)[1]["act"] == "gelu"
    fake_tag(monkeypatch, sha=c.weights_sha256)  # the published archive itself
    assert load_clip(TINY_MODEL, str(archive)).weights_sha256 == c.weights_sha256


def test_garbage_weights_file_is_one_whole_sentence(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 12)
    with pytest.raises(WeightsFileError) as error:
        load_clip(TINY_MODEL, str(garbage))
    assert str(error.value) == (
        "cannot read weights file garbage.pt: it is not a torch state dict or safetensors file "
        "(UnpicklingError); pass a state dict saved by torch.save(model.state_dict()) or safetensors"
    )

    # an object besides tensors (here a path object): unpickling it could run code
    torch.save({"visual.proj": torch.zeros(2), "extra": pathlib.PurePosixPath("x")}, garbage)
    with pytest.raises(WeightsFileError, match="holds Python objects besides tensors"):
        load_clip(TINY_MODEL, str(garbage))


def fake_tag(monkeypatch, sha: str = "0" * 64, **cfg) -> None:
    """Register a tag for the tiny model whose weights live at a URL named by `sha` (no network used)."""
    from open_clip import pretrained

    url = f"https://openaipublic.azureedge.net/clip/models/{sha}/tiny.pt"
    monkeypatch.setitem(
        pretrained._PRETRAINED, TINY_MODEL, {"cachedtag": {"url": url, "hf_hub": "", **cfg}}
    )


def hub_tag(monkeypatch, cache: pathlib.Path, **cfg) -> pathlib.Path:
    """Register a tag for the tiny model on a Hugging Face repo, and that repo's snapshot folder in
    the hub cache `cache` (where open_clip's lookup finds `open_clip_pytorch_model.bin`)."""
    from open_clip import pretrained

    monkeypatch.setitem(
        pretrained._PRETRAINED, TINY_MODEL, {"cachedtag": {"hf_hub": "fsar/tiny/", **cfg}}
    )
    repo = cache / "models--fsar--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    return repo / "snapshots" / ("0" * 40)


def test_tag_from_local_cache_with_its_preprocess(tiny, tmp_path, monkeypatch):
    snapshot = hub_tag(
        monkeypatch,
        tmp_path,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation="bilinear",
    )
    torch.save(tiny.model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    c = load_clip(TINY_MODEL, "cachedtag", cache_dir=str(tmp_path))
    assert c.pretrained == "cachedtag"
    data = (snapshot / "open_clip_pytorch_model.bin").read_bytes()
    assert c.weights_sha256 == hashlib.sha256(data).hexdigest()
    assert c.preprocess.mean == (0.5, 0.5, 0.5) and c.preprocess.interpolation == "bilinear"
    torch.testing.assert_close(c.model.visual.proj, tiny.model.visual.proj, rtol=0, atol=0)
    (snapshot / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(PretrainedUnavailable, match="not in the local cache"):
        load_clip(TINY_MODEL, "cachedtag", cache_dir=str(tmp_path))


def test_an_unreachable_hub_is_asked_nothing(tmp_path, monkeypatch):
    """Online by the settings but huggingface.co unreachable: open_clip's lookup runs once, with the
    hub offline (its cache only), then one line says what to do."""
    import huggingface_hub.constants

    from pipeline import weights

    hub_tag(monkeypatch, tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(weights, "_hf_offline", lambda: False)
    monkeypatch.setattr(weights, "_host_reachable", lambda host: False)
    offline_during_lookup = []

    def lookup(cfg, cache_dir=None):  # type: ignore[no-untyped-def]
        offline_during_lookup.append(huggingface_hub.constants.HF_HUB_OFFLINE)
        raise FileNotFoundError("not cached")

    monkeypatch.setattr(open_clip, "download_pretrained", lookup)
    with pytest.raises(PretrainedUnavailable) as error:
        load_clip(TINY_MODEL, "cachedtag", cache_dir=str(tmp_path))
    assert offline_during_lookup == [True]
    assert "is not in the local cache and huggingface.co is unreachable" in str(error.value)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored


def test_openai_published_sha_switches_on_quick_gelu(tiny, tmp_path, monkeypatch):
    p = tmp_path / "renamed.pt"
    torch.save(tiny.model.state_dict(), p)
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    fake_tag(monkeypatch, sha=sha, quick_gelu=True)
    assert export_last_block(load_clip(TINY_MODEL, str(p)).model)[1]["act"] == "quick_gelu"
    fake_tag(monkeypatch, sha="f" * 64, quick_gelu=True)
    assert export_last_block(load_clip(TINY_MODEL, str(p)).model)[1]["act"] == "gelu"


def test_preprocess_transform_is_open_clips(tiny):
    _, _, val = open_clip.create_model_and_transforms(TINY_MODEL)
    assert repr(tiny.preprocess.transform()) == repr(val)
    assert tiny.preprocess.as_dict()["image_size"] == [64, 64]
