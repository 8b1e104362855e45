"""Check that fsar's open_clip taps are the released (Hugging Face) CLIP's hidden states.

Run by hand in an environment with transformers (see make_tsfsar_init.py), never by the tests:

    /tmp/ref/bin/python tests/reference/check_hf_mapping.py [ViT-B-16]

Builds the open_clip model (random init, seed 0), copies its weights into a Hugging Face
CLIPVisionModelWithProjection under the mapping fsar documents (class_embedding, conv1,
positional_embedding; ln_pre = pre_layrnorm; in_proj thirds = q/k/v_proj; out_proj; ln_1/ln_2 =
layer_norm1/2; mlp.c_fc/c_proj = fc1/fc2; ln_post = post_layernorm; proj = visual_projection.T),
runs both on the same frames and prints the largest difference of every tap (tap 0 = pre_layrnorm
output = ln_pre output; tap k = encoder layer k's output = resblock k's output) and of the projected
CLS that TS-FSAR's Adapter reads.
"""

from __future__ import annotations

import sys

import open_clip
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection


def hf_state(visual: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight,
        "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
        "visual_projection.weight": visual.proj.T,
    }
    for i, block in enumerate(visual.transformer.resblocks):
        p = f"vision_model.encoder.layers.{i}."
        for name, w, b in zip(
            ("q_proj", "k_proj", "v_proj"),
            block.attn.in_proj_weight.chunk(3),
            block.attn.in_proj_bias.chunk(3),
            strict=True,
        ):
            sd[p + f"self_attn.{name}.weight"], sd[p + f"self_attn.{name}.bias"] = w, b
        sd[p + "self_attn.out_proj.weight"] = block.attn.out_proj.weight
        sd[p + "self_attn.out_proj.bias"] = block.attn.out_proj.bias
        for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            sd[p + f"{theirs}.weight"] = getattr(block, ours).weight
            sd[p + f"{theirs}.bias"] = getattr(block, ours).bias
        for ours, theirs in (("c_fc", "fc1"), ("c_proj", "fc2")):
            sd[p + f"mlp.{theirs}.weight"] = getattr(block.mlp, ours).weight
            sd[p + f"mlp.{theirs}.bias"] = getattr(block.mlp, ours).bias
    return {k: v.detach().clone() for k, v in sd.items()}


def main(model_name: str) -> None:
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=True).eval()
    visual = model.visual
    width = visual.transformer.width
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=visual.transformer.resblocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=visual.transformer.resblocks[0].attn.num_heads,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        projection_dim=visual.proj.shape[1],
        hidden_act="quick_gelu",
    )
    hf = CLIPVisionModelWithProjection(config).eval()
    missing, unexpected = hf.load_state_dict(hf_state(visual), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    frames = torch.randn(4, 3, *visual.image_size)
    taps = []
    hooks = [visual.ln_pre.register_forward_hook(lambda m, i, o: taps.append(o))]
    for block in visual.transformer.resblocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: taps.append(o)))
    with torch.no_grad():
        ours = model.encode_image(frames)
        theirs = hf(pixel_values=frames, output_hidden_states=True)
    for h in hooks:
        h.remove()
    # HF's encoder receives the pre_layrnorm output: hidden_states[0] is what the released LSN
    # computes as pre_layernorm(embeddings(x)), hidden_states[k] encoder layer k's output.
    for k, (a, b) in enumerate(zip(taps, theirs.hidden_states, strict=True)):
        scale = b.abs().max().item()
        print(
            f"tap {k:2d}: max |open_clip - HF| = {(a - b).abs().max().item():.2e} (max |HF| {scale:.2f})"
        )
    cls = hf.visual_projection(hf.vision_model.post_layernorm(theirs.hidden_states[-1][:, 0]))
    print(f"proj(ln_post(CLS)): max diff {(ours - cls).abs().max().item():.2e}")
    print(f"image_embeds:       max diff {(ours - theirs.image_embeds).abs().max().item():.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ViT-B-16")
