"""`lastlayer` (Cao et al. 2024): fine-tune only the last CLIP block + ln_post + proj.

Three names, three things: `lastlayer` is this head (its `--head` name); `heads/clip_block.py` is
CLIP's last block as a torch module; `store/weights_format.py` reads and writes the file the store
keeps it in, `weights/lastblock.safetensors`. The block is rebuilt from that file and runs
on the cached residual stream `tokens/layer{last}_in`; only the CLS output is computed. A video's
feature is the time mean of the L2-normalised projected CLS; scores are cosines times a learnable
scale. Strategies:
  meta      episodic training on base classes (prototypes from the support set);
  finetune  batch cross-entropy over all base classes with a classifier initialised from class
            texts; prototypes at test;
  novel     no base training: each test episode fine-tunes a fresh copy of the block on its
            support set for a few steps (the setting the paper argues against).
Full fine-tuning and adapters need pixels and are out of scope here.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from store.layout import layer_in_name

from .base import Features, FewShotHead, class_means, last_layer
from .clip_block import LastBlock, load_last_block
from .episodes import Episode, EpisodeSampler

if TYPE_CHECKING:
    import pandas as pd

    from .config import TrainConfig

STRATEGIES = ("meta", "finetune", "novel")


class LastLayer(FewShotHead):
    name = "lastlayer"
    uses_text = True

    def __init__(
        self,
        strategy: str = "meta",
        temperature: float = 0.07,
        novel_steps: int = 5,
        novel_lr: float = 1e-5,
    ) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)} (got {strategy!r})")
        self.strategy = strategy
        self.novel_steps = novel_steps
        self.novel_lr = novel_lr
        self.trainable = strategy != "novel"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.block: LastBlock | None = None
        self.classifier: nn.Parameter | None = None
        self._config = {
            "strategy": strategy,
            "temperature": temperature,
            "novel_steps": novel_steps,
            "novel_lr": novel_lr,
        }

    # ---------------------------------------------------------------- set-up
    def inputs(self, spec: dict[str, Any]) -> dict[str, str]:
        return {"tokens_in": layer_in_name(last_layer(spec))}

    def prepare(self, store: Any) -> None:
        super().prepare(store)
        if self.block is None:
            self.load_store_block(*store.read_lastblock())
        if self.strategy == "finetune" and self.classifier is None:
            m = store.manifest
            self.init_classifier(
                torch.as_tensor(np.unique(m.loc[m["split"] == "train", "label"].to_numpy()))
            )

    def set_block(self, block: LastBlock) -> None:
        """Use this block (e.g. rebuilt from a store); its parameters become the head's."""
        self.block = block.to(self.logit_scale.device)

    def load_store_block(self, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
        """Rebuild the block from the store's exported weights."""
        self.set_block(load_last_block(tensors, config))

    def init_classifier(self, class_ids: torch.Tensor) -> None:
        """`finetune`: a linear classifier over `class_ids`, initialised from normalised class texts."""
        text = F.normalize(self.class_text.mean(1)[class_ids], dim=-1)
        self.classifier = nn.Parameter(text.clone())
        self.register_buffer("classifier_ids", class_ids.clone())

    def _require_block(self) -> LastBlock:
        if self.block is None:
            raise RuntimeError(
                "lastlayer has no block: call load_store_block(*store.read_lastblock())"
            )
        return self.block

    # ---------------------------------------------------------------- per video
    def encode(self, tokens_in: torch.Tensor, block: LastBlock | None = None) -> torch.Tensor:
        """(B, T, L, W) residual stream -> (B, D) time mean of normalised projected CLS."""
        block = block or self._require_block()
        b, t = tokens_in.shape[:2]
        cls = block(tokens_in.reshape(b * t, *tokens_in.shape[2:]).float(), cls_only=True)
        return F.normalize(cls, dim=-1).reshape(b, t, -1).mean(1)

    def video_features(self, inputs: Features) -> Features:
        if self.strategy == "novel":  # the block changes per episode: keep the inputs
            return {"tokens_in": inputs["tokens_in"]}
        return {"video": self.encode(inputs["tokens_in"])}

    def classifier_logits(self, features: Features) -> torch.Tensor:
        """`finetune`: (B, n_classes) scaled cosines against the text-initialised classifier."""
        assert self.classifier is not None, "call init_classifier first"
        v = F.normalize(features["video"], dim=-1)
        return self.logit_scale.exp() * v @ F.normalize(self.classifier, dim=-1).T

    # ---------------------------------------------------------------- training
    def train_sampler(self, manifest: pd.DataFrame, cfg: TrainConfig) -> EpisodeSampler:
        """`finetune`: batches spread over as many base classes as fit in `cfg.batch_size`."""
        if self.strategy != "finetune":
            return super().train_sampler(manifest, cfg)
        n_classes = len(EpisodeSampler(manifest, 1, 1, 0, split="train").class_names)
        way, shot = min(n_classes, cfg.batch_size), max(1, cfg.batch_size // n_classes)
        return EpisodeSampler(manifest, way, shot, 0, cfg.seed, cfg.episodes, "train")

    def episode_loss(self, episode: Episode, inputs: Features) -> torch.Tensor:
        """`finetune`: cross-entropy over all base classes, the episode's videos as the batch."""
        if self.strategy != "finetune":
            return super().episode_loss(episode, inputs)
        logits = self.classifier_logits(self.video_features(inputs))
        labels = episode.class_ids[np.concatenate([episode.support_labels, episode.query_labels])]
        target = torch.searchsorted(
            self.classifier_ids, torch.as_tensor(labels, device=logits.device)
        )
        return F.cross_entropy(logits.float(), target)

    # ---------------------------------------------------------------- per episode
    def _scores(self, query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        cos = F.cosine_similarity(query.unsqueeze(2), prototypes.unsqueeze(1), dim=-1)
        return self.logit_scale.exp() * cos

    def support_means(self, shot: int) -> tuple[str, ...] | None:
        return None if self.strategy == "novel" else ("video",)

    def _support(self, support: Features, labels: torch.Tensor, class_ids: torch.Tensor) -> None:
        n_way = class_ids.shape[1]
        if self.strategy != "novel":
            self._prototypes = class_means(support["video"], labels, n_way)
            self._episode_blocks = None
            return
        self._episode_blocks = [
            self._fit_episode(support["tokens_in"][e], labels[e], class_ids[e])
            for e in range(labels.shape[0])
        ]
        with torch.no_grad():
            videos = torch.stack(
                [
                    self.encode(support["tokens_in"][e], blk)
                    for e, blk in enumerate(self._episode_blocks)
                ]
            )
        self._prototypes = class_means(videos, labels, n_way)

    def _fit_episode(
        self, tokens_in: torch.Tensor, labels: torch.Tensor, class_ids: torch.Tensor
    ) -> LastBlock:
        """`novel`: a few Adam steps of a fresh block copy on one support set (text-initialised classifier)."""
        block = copy.deepcopy(self._require_block())
        weights = nn.Parameter(F.normalize(self.class_text.mean(1)[class_ids], dim=-1).clone())
        optimizer = torch.optim.Adam([*block.parameters(), weights], lr=self.novel_lr)
        scale = self.logit_scale.detach().exp()
        with torch.enable_grad():
            for _ in range(self.novel_steps):
                video = self.encode(tokens_in, block)
                logits = scale * F.normalize(video, dim=-1) @ F.normalize(weights, dim=-1).T
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return block

    def _query(self, query: Features) -> torch.Tensor:
        if self._episode_blocks is None:
            videos = query["video"]
        else:
            with torch.no_grad():
                videos = torch.stack(
                    [
                        self.encode(query["tokens_in"][e], blk)
                        for e, blk in enumerate(self._episode_blocks)
                    ]
                )
        self._logits = self._scores(videos, self._prototypes)
        return self._logits

    def _loss(self, query_labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits.flatten(0, 1), query_labels.flatten())
