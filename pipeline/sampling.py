"""Which frames of a video a store row holds: `views` lists of `frames` indices, seeded per video.

Sampling knows nothing about decoding (it gets the number of frames that decoded); docs/extraction.md.
"""

from __future__ import annotations

import numpy as np

from pipeline.hashing import stable_hash


def sample_frame_indices(n_frames: int, frames: int, views: int, video_id: str) -> list[list[int]]:
    """Frame indices: `views` lists of `frames` indices in `[0, n_frames)`, non-decreasing.

    View 0: centre of each of `frames` equal segments. Views 1..: one uniformly random frame per
    segment of `n_frames // frames` frames (EMP-Net's `_interval_based_sampling` with SAMPLING_RATE > 40:
    `randint(i * interval, i * interval + interval - 1)`), from a generator seeded by
    `stable_hash(video_id)` and the view number (same on every machine). Videos shorter than `frames`
    (where the released code fails) draw from equal fractional segments instead, repeating frames.
    """
    if n_frames < 1:
        raise ValueError("n_frames must be at least 1")
    if frames < 1 or views < 1:
        raise ValueError("frames and views must be at least 1")
    segment = n_frames / frames
    starts = [segment * i for i in range(frames)]
    result = [[min(n_frames - 1, int(start + segment / 2)) for start in starts]]
    seed = stable_hash(video_id)
    interval = n_frames // frames
    for view in range(1, views):
        rng = np.random.default_rng([seed, view])
        indices = []
        for i, start in enumerate(starts):
            if interval >= 1:
                low, high = i * interval, (i + 1) * interval
            else:
                low = int(start)
                high = max(low + 1, int(start + segment))
            indices.append(min(n_frames - 1, int(rng.integers(low, high))))
        result.append(indices)
    return result
