"""heads.threads: small heads train on one thread, large ones on all; the count is restored."""

from __future__ import annotations

import torch

from heads.threads import restores_threads, step_threads
from store.random_store import random_spec


def test_small_heads_step_on_one_thread_large_ones_on_all() -> None:
    small = random_spec(frames=8, views=2, dim=64, width=64, patches=16)
    large = random_spec(frames=8, views=1, dim=512, width=768, patches=196)
    names = ["tokens/layer04", "tokens/layer12"]
    threads = torch.get_num_threads()
    assert step_threads(small, names, 30) == 1  # 30 videos x 8 x 17 x 64 = 261,120 elements
    assert step_threads(large, names, 30) == threads  # 24 million
    assert step_threads(large, ["cls/layer12"], 30) == 1


def test_thread_count_is_restored_after_the_call_even_on_error() -> None:
    threads = torch.get_num_threads()

    @restores_threads
    def change(fail: bool) -> int:
        torch.set_num_threads(1)
        if fail:
            raise RuntimeError("boom")
        return torch.get_num_threads()

    assert change(False) == 1 and torch.get_num_threads() == threads
    try:
        change(True)
    except RuntimeError:
        pass
    assert torch.get_num_threads() == threads
