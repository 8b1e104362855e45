"""Write tsfsar_init_reference.npz: the released `LSN.prune_and_initialize` on known CLIP blocks.

Run once with the released code, never imported by the tests (they read the .npz). Needs the
released repository in a scratch folder and the released environment's scikit-learn, e.g.

    git -C /path/TS-FSAR-mirror archive HEAD | tar -x -C /tmp/ts_fsar_released
    python -m venv /tmp/ref && /tmp/ref/bin/pip install numpy==1.26.4 scipy==1.11.4 \
        scikit-learn==1.3.2 transformers==4.46.3 torch
    /tmp/ref/bin/python tests/reference/make_tsfsar_init.py /tmp/ts_fsar_released

For every case of tsfsar_weights.CASES it builds a Hugging Face CLIP vision model whose encoder
layers hold `layer_weights`, seeds numpy's global stream with 0 as the released main.py does, builds
the released LSN (which runs prune_and_initialize) and keeps a fixed subsample of every side-block
and Adapter tensor under fsar's key names (store/layout.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from tsfsar_weights import CASES, DEPTH, layer_weights, sample  # noqa: E402


def released_lsn(released: Path, width: int, side: int, adapter: int):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    sys.path.insert(0, str(released))
    from trainers.model import LSN

    lsn_cfg = dict(EMBED_DIM=side, MLP_RATIO=4.0, QKV_BIAS=True, QK_SCALE=None, DROP=0.0)
    lsn_cfg |= dict(ATTN_DROP=0.0, HIDDEN_DIM=width, OUTPUT_DIM=side, ADAPTER_DIM=adapter)
    lsn_cfg |= dict(USE_GATE="learnable", REMOVE_PROJ=True, NUM_LAYERS=DEPTH, TEMP_LAYERS=[])
    lsn_cfg |= dict(GATE_T=0.1, GATE_ALPHA=0)
    cfg = SimpleNamespace(
        LSN=SimpleNamespace(**lsn_cfg),
        DATA=SimpleNamespace(NUM_INPUT_FRAMES=8, RES_ALPHA=0.4),
        TEST=SimpleNamespace(ENABLE=False),
    )
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=DEPTH,
        num_attention_heads=8,
        image_size=32,
        patch_size=16,
        projection_dim=adapter,
    )
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(config)
    for k, layer in enumerate(clip.vision_model.encoder.layers, start=1):
        state = {n: torch.from_numpy(v) for n, v in layer_weights(width, k).items()}
        layer.load_state_dict(state)
    np.random.seed(0)  # main.py, before build_model and TS_FSAR(cfg, image_clip)
    return LSN(clip, cfg)


def fsar_keys(lsn) -> dict[str, np.ndarray]:
    out = {}
    names = {"q": "q_linear", "k": "k_linear", "v": "v_linear", "proj": "proj"}
    for i, block in enumerate(lsn.side_transformer, start=1):
        prefix = f"block{i:02d}"
        for ours, theirs in names.items():
            lin = getattr(block.attn, theirs)
            out[f"{prefix}.attn.{ours}.weight"] = lin.weight
            out[f"{prefix}.attn.{ours}.bias"] = lin.bias
        for norm in ("norm1", "norm2"):
            out[f"{prefix}.{norm}.weight"] = getattr(block, norm).weight
            out[f"{prefix}.{norm}.bias"] = getattr(block, norm).bias
        for fc in ("fc1", "fc2"):
            out[f"{prefix}.mlp.{fc}.weight"] = getattr(block.mlp, fc).weight
            out[f"{prefix}.mlp.{fc}.bias"] = getattr(block.mlp, fc).bias
    for ours, theirs in names.items():
        lin = getattr(lsn.Adapter.attn, theirs)
        out[f"adapter.attn.{ours}.weight"] = lin.weight
        out[f"adapter.attn.{ours}.bias"] = lin.bias
    return {k: v.detach().numpy().copy() for k, v in out.items()}


def main(released: Path, out: Path) -> None:
    import scipy
    import sklearn
    import torch
    import transformers

    arrays = {}
    for case, (width, side, adapter) in CASES.items():
        for key, value in fsar_keys(released_lsn(released, width, side, adapter)).items():
            arrays[f"{case}/{key}"] = sample(value)
            arrays[f"{case}/{key}/shape"] = np.asarray(value.shape)
            arrays[f"{case}/{key}/norm"] = np.asarray(np.linalg.norm(value.astype(np.float64)))
    made_with = (
        f"sklearn {sklearn.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, "
    )
    made_with += f"torch {torch.__version__}, transformers {transformers.__version__}"
    arrays["made_with"] = np.asarray(made_with)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({made_with})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), HERE / "tsfsar_init_reference.npz")
