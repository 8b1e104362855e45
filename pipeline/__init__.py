"""Stage 1: decode videos, sample frames, run a frozen open_clip ViT, write a feature store."""
