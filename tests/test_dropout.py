"""heads.dropout: ParallelDropout drops the right fraction, scales, is reproducible and trains."""

from __future__ import annotations

import pytest
import torch

from heads.dropout import (
    MIN_ELEMENTS,
    PARALLEL_MIN_ELEMENTS,
    ParallelDropout,
    parallel_dropout,
    quantised_drop_probability,
)

N = 4 * PARALLEL_MIN_ELEMENTS  # 4M elements: the parallel path, binomial std of the rate ~ 0.0002


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_drops_the_requested_fraction_and_scales_the_rest(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(N // 1024, 1024) + 1.0  # no zeros, so a zero means dropped
    out = parallel_dropout(x, p)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - p) < 0.002
    scale = 1.0 / (1.0 - quantised_drop_probability(p))
    torch.testing.assert_close(out[~dropped], x[~dropped] * scale)
    # the halves come from different generators: both drop at the rate, and their masks are not
    # copies of each other
    halves = dropped.flatten().chunk(2)
    assert all(abs(h.float().mean().item() - p) < 0.003 for h in halves)
    assert (halves[0] == halves[1]).float().mean().item() < 1 - p * (1 - p)


def test_masks_follow_torch_manual_seed_and_differ_between_calls() -> None:
    x = torch.ones(N)
    torch.manual_seed(3)
    a, b = parallel_dropout(x, 0.2), parallel_dropout(x, 0.2)
    torch.manual_seed(3)
    a2 = parallel_dropout(x, 0.2)
    assert torch.equal(a, a2)
    assert not torch.equal(a, b)


def test_masks_do_not_depend_on_the_number_of_threads() -> None:
    x = torch.ones(N)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(5)
        one = parallel_dropout(x, 0.2)
        torch.set_num_threads(2)
        torch.manual_seed(5)
        two = parallel_dropout(x, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_gradient_is_the_mask_times_the_scale() -> None:
    torch.manual_seed(0)
    x = (torch.rand(N) + 1.0).requires_grad_(True)
    out = ParallelDropout(0.2)(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out.detach() != 0).float() / (1 - 0.2))


def test_mid_size_tensors_draw_on_one_generator_at_the_same_rate() -> None:
    """Below PARALLEL_MIN_ELEMENTS (EMP-Net's tensors at small store dims) the masks come from one
    generator on the calling thread: same rate, scale, gradient and reproducibility."""
    n = 64 * MIN_ELEMENTS
    assert n < PARALLEL_MIN_ELEMENTS
    x = (torch.rand(n, generator=torch.Generator().manual_seed(0)) + 1.0).requires_grad_(True)
    torch.manual_seed(0)
    out = parallel_dropout(x, 0.2)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.2) < 0.003
    scale = 1.0 / (1.0 - quantised_drop_probability(0.2))
    torch.testing.assert_close(out[~dropped], x[~dropped] * scale)
    out.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).float() * scale)
    torch.manual_seed(0)
    assert torch.equal(parallel_dropout(x.detach(), 0.2), out.detach())


def test_eval_mode_small_tensors_and_bad_probability() -> None:
    layer = ParallelDropout(0.3).eval()
    x = torch.randn(N)
    assert layer(x) is x
    assert parallel_dropout(x, 0.0) is x
    small = torch.ones(1000)  # below PARALLEL_MIN_ELEMENTS: torch's own dropout, same masks
    torch.manual_seed(0)
    ours = parallel_dropout(small, 0.5)
    torch.manual_seed(0)
    assert torch.equal(ours, torch.nn.functional.dropout(small, 0.5, True))
    assert torch.equal(parallel_dropout(x, 1.0), torch.zeros_like(x))
    assert torch.equal(parallel_dropout(x, 1 - 1e-7), torch.zeros_like(x))  # rounds to 1
    with pytest.raises(ValueError, match="between 0 and 1"):
        parallel_dropout(x, 1.5)
