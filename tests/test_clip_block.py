"""heads.clip_block: the plain-torch rebuild of CLIP's last block reproduces the cached tokens."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch

from heads.clip_block import LastBlock, load_last_block
from pipeline.encoder import FrameEncoder, export_last_block
from pipeline.errors import UnsupportedModel
from pipeline.model import TINY_MODEL, load_clip
from store.weights_format import weights_from_bytes, weights_to_bytes

torch.set_num_threads(1)


def frames(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def tiny_variant(kind: str) -> torch.nn.Module:
    """The tiny ViT with GELU, QuickGELU, or layer scale (random init, frozen)."""
    if kind == "gelu":
        return load_clip(TINY_MODEL, "none").model
    if kind == "quick_gelu":
        return load_clip(TINY_MODEL, "none", quick_gelu=True).model
    cfg = copy.deepcopy(open_clip.get_model_config(TINY_MODEL))
    cfg["vision_cfg"]["ls_init_value"] = 0.5
    torch.manual_seed(1)
    m = open_clip.create_model(TINY_MODEL, vision_cfg=cfg["vision_cfg"]).eval()
    with torch.no_grad():  # make the gammas differ from their init so a dropped gamma is caught
        for blk in m.visual.transformer.resblocks:
            blk.ls_1.gamma.uniform_(0.2, 1.5)
            blk.ls_2.gamma.uniform_(0.2, 1.5)
    return m


@pytest.fixture(scope="module", params=["gelu", "quick_gelu", "layer_scale"])
def case(request):
    model = tiny_variant(request.param)
    enc = FrameEncoder(model, recipe="emp+last")
    x = frames(6, seed=7)
    tensors, config = export_last_block(model)
    return request.param, enc, x, tensors, config


def test_export_config(case):
    kind, _, _, tensors, config = case
    assert config["act"] == ("quick_gelu" if kind == "quick_gelu" else "gelu")
    assert config["layer_scale"] is (kind == "layer_scale")
    assert (config["width"], config["heads"], config["mlp_ratio"], config["dim"]) == (
        64,
        4,
        4.0,
        32,
    )
    assert config["ln_eps"] == pytest.approx(1e-5)
    expected = {
        "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
        "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_post.weight", "ln_post.bias", "proj",
    }  # fmt: skip
    if kind == "layer_scale":
        expected |= {"ls_1.gamma", "ls_2.gamma"}
    assert set(tensors) == expected
    assert tensors["proj"].shape == (64, 32) and all(
        t.dtype == torch.float32 for t in tensors.values()
    )


def test_rebuilt_block_reproduces_cached_layer12(case):
    _, enc, x, tensors, config = case
    block = load_last_block(tensors, config)
    # exact path: fp32 residual stream in -> fp32 layer-12 tokens out
    t = enc.encode_torch(x)
    with torch.no_grad():
        torch.testing.assert_close(
            block(t["tokens/layer12_in"]), t["tokens/layer12"], rtol=1e-4, atol=1e-5
        )
    # the store's path: fp16 layer12_in -> equals the fp16 layer12 within fp16 tolerance
    cached = enc(x)
    with torch.no_grad():
        y = block(torch.from_numpy(cached["tokens/layer12_in"])).numpy()
    ref = cached["tokens/layer12"].astype(np.float32)
    np.testing.assert_allclose(y, ref, rtol=0, atol=5e-3 * np.abs(ref).max())


def test_cls_only_equals_full_cls(case):
    _, enc, x, tensors, config = case
    block = load_last_block(tensors, config)
    xin = torch.from_numpy(enc(x)["tokens/layer12_in"])
    with torch.no_grad():
        full = block(xin)
        cls = block(xin, cls_only=True)
    assert cls.shape == (6, 32)
    torch.testing.assert_close(cls, full[:, 0], rtol=1e-5, atol=1e-6)


def test_parameters_are_trainable(case):
    _, enc, x, tensors, config = case
    block = load_last_block(tensors, config)
    params = dict(block.named_parameters())
    assert set(params) == set(tensors) and all(p.requires_grad for p in params.values())
    xin = torch.from_numpy(enc(x)["tokens/layer12_in"])
    block(xin, cls_only=True).pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    before = block.proj.detach().clone()
    opt.step()
    assert not torch.equal(before, block.proj)
    assert torch.equal(tensors["proj"], before), "the exported tensors must not alias the block"


def test_bytes_roundtrip(case):
    _, _, _, tensors, config = case
    data = weights_to_bytes(tensors, config)
    arrays, cfg = weights_from_bytes(data)
    assert cfg == config
    assert set(arrays) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(arrays[k], v.numpy())
    rebuilt = load_last_block(arrays, cfg)  # numpy input works too
    torch.testing.assert_close(rebuilt.state_tensors()["proj"], tensors["proj"])


def test_bad_state_and_config_are_refused(case):
    _, _, _, tensors, config = case
    with pytest.raises(ValueError, match="lacks heads"):
        load_last_block(tensors, {k: v for k, v in config.items() if k != "heads"})
    with pytest.raises(ValueError, match="act must be gelu or quick_gelu"):
        load_last_block(tensors, {**config, "act": "relu"})
    with pytest.raises(ValueError, match="not divisible by heads"):
        load_last_block(tensors, {**config, "heads": 5})
    with pytest.raises(ValueError, match=r"missing \['proj'\]"):
        load_last_block({k: v for k, v in tensors.items() if k != "proj"}, config)
    with pytest.raises(ValueError, match="proj has shape"):
        load_last_block({**tensors, "proj": torch.zeros(64, 16)}, config)
    from safetensors.numpy import save

    with pytest.raises(ValueError, match="lacks the 'config' metadata"):
        weights_from_bytes(save({"proj": np.zeros((2, 2), np.float32)}))


def test_blocks_with_unsupported_features_are_refused():
    cfg = copy.deepcopy(open_clip.get_model_config(TINY_MODEL))
    cfg["vision_cfg"]["qk_norm"] = True
    m = open_clip.create_model(TINY_MODEL, vision_cfg=cfg["vision_cfg"])
    with pytest.raises(UnsupportedModel, match="not a plain CLIP resblock"):
        export_last_block(m)


def test_module_does_not_import_open_clip():
    code = (
        "import sys; sys.modules['open_clip'] = None\n"
        "import heads.clip_block as lb\n"
        "b = lb.LastBlock(width=8, heads=2, dim=4)\n"
        "import torch; print(tuple(b(torch.zeros(1, 3, 8)).shape))\n"
        "assert 'open_clip' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 3, 4)"


def test_defaults_match_constructor():
    b = LastBlock(width=16, heads=4, dim=8)
    assert b.config == {
        "width": 16, "heads": 4, "mlp_ratio": 4.0, "act": "gelu", "ln_eps": 1e-5, "layer_scale": False, "dim": 8,
    }  # fmt: skip
