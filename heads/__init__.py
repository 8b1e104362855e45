"""Stage 2: few-shot reasoning heads trained and evaluated from cached features only (never open_clip)."""
