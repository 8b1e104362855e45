"""OTAM against brute force over every path the released recursion allows."""

from __future__ import annotations

import math

import pytest
import torch

from heads.otam import otam_bidirectional, otam_distance, otam_distance_loop


def path_costs(d: torch.Tensor) -> list[float]:
    """Costs of all paths into the bottom-right pad cell, following the released predecessors."""
    padded = torch.nn.functional.pad(d, (1, 1)).tolist()
    n_rows, n_cols = len(padded), len(padded[0])

    def predecessors(r: int, m: int) -> list[tuple[int, int]]:
        if r == 0:
            return [(0, m - 1)]  # top row: plain cumulative sum
        if m == 1 or m == n_cols - 1:
            return [(r - 1, m - 1), (r - 1, m), (r, m - 1)]
        return [(r - 1, m - 1), (r, m - 1)]

    def walk(r: int, m: int) -> list[float]:
        if m == 0:
            return [0.0]  # column 0 holds 0 in every row
        return [padded[r][m] + c for p in predecessors(r, m) for c in walk(*p)]

    return walk(n_rows - 1, n_cols - 1)


SHAPES = [(1, 1), (1, 4), (3, 1), (2, 2), (3, 4), (4, 3), (4, 4)]


@pytest.mark.parametrize("shape", SHAPES)
def test_soft_otam_equals_logsumexp_over_paths(shape: tuple[int, int]) -> None:
    torch.manual_seed(sum(shape))
    d = torch.rand(*shape, dtype=torch.float64) * 2
    for smoothing in (0.5, 0.1, 2.0):
        costs = torch.tensor(path_costs(d), dtype=torch.float64)
        want = -smoothing * torch.logsumexp(-costs / smoothing, dim=0)
        assert otam_distance(d, smoothing).item() == pytest.approx(want.item(), abs=1e-9)
        assert otam_distance_loop(d, smoothing).item() == pytest.approx(want.item(), abs=1e-9)


def test_float32_follows_float64_and_long_sequences_stay_finite() -> None:
    torch.manual_seed(5)
    d = torch.rand(4, 5, 3, 8, 8) * 2  # 1 - cosine range, evaluation shapes, float32
    got = otam_bidirectional(d)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), otam_bidirectional(d.double()), atol=1e-5, rtol=1e-6)
    # long sequences and a small lambda: exp(-cost / lambda) would underflow float32, the
    # log-space recursion does not
    long = 1.5 + torch.rand(2, 64, 64) * 0.5
    torch.testing.assert_close(
        otam_distance(long, 0.5).double(), otam_distance(long.double(), 0.5), rtol=1e-5, atol=1e-3
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_hard_minimum_as_lambda_goes_to_zero(shape: tuple[int, int]) -> None:
    torch.manual_seed(7 + sum(shape))
    d = torch.rand(*shape, dtype=torch.float64)
    best = min(path_costs(d))
    assert otam_distance(d, 1e-4).item() == pytest.approx(best, abs=1e-3)
    # soft-min never exceeds the hard minimum and approaches it monotonically
    values = [otam_distance(d, lb).item() for lb in (1.0, 0.3, 0.1, 0.01)]
    assert all(v <= best + 1e-12 for v in values)
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:], strict=False))


def test_batched_and_bidirectional() -> None:
    torch.manual_seed(0)
    d = torch.rand(3, 5, 8, 6)
    batched = otam_distance(d)
    for i in range(3):
        for j in range(5):
            assert batched[i, j].item() == pytest.approx(otam_distance(d[i, j]).item(), abs=1e-5)
    both = otam_bidirectional(d)
    assert torch.allclose(both, otam_distance(d) + otam_distance(d.transpose(-1, -2)))


def test_gradients_are_finite_and_order_matters() -> None:
    torch.manual_seed(1)
    d = torch.rand(8, 8, requires_grad=True)
    otam_bidirectional(d).backward()
    assert torch.isfinite(d.grad).all() and d.grad.abs().sum() > 0
    # a diagonal of zeros (aligned sequences) beats the anti-diagonal (time-reversed)
    aligned = 1 - torch.eye(6)
    reversed_ = aligned.flip(0)
    assert otam_bidirectional(aligned) < otam_bidirectional(reversed_)
    assert math.isfinite(otam_distance(torch.full((8, 8), 2.0), 0.01).item())


def test_frame_cosine_equals_the_broadcast_cosine() -> None:
    from heads.base import cosine_similarity, frame_cosine

    torch.manual_seed(3)
    query, support = torch.randn(2, 3, 4, 6, 16), torch.randn(2, 3, 5, 7, 16)
    want = cosine_similarity(query.unsqueeze(-3), support.unsqueeze(-4), 0.01)
    got = frame_cosine(query, support, 0.01)
    assert got.shape == (2, 3, 4, 5, 6, 7)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # norms computed once per video give the same cosines
    norms = frame_cosine(query, support, 0.01, query.norm(dim=-1), support.norm(dim=-1))
    torch.testing.assert_close(norms, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 3), (3, 1), (4, 4), (8, 8), (5, 7)])
def test_gradient_equals_autograd_through_the_released_loop(shape) -> None:
    """The recursion gives the released loop's gradients."""
    torch.manual_seed(sum(shape))
    d = (torch.rand(2, 3, *shape, dtype=torch.float64) * 2).requires_grad_(True)
    (ours,) = torch.autograd.grad(otam_bidirectional(d).sum(), d)
    loop = otam_distance_loop(d) + otam_distance_loop(d.transpose(-1, -2))
    (want,) = torch.autograd.grad(loop.sum(), d)
    torch.testing.assert_close(ours, want, atol=1e-10, rtol=1e-8)
    assert torch.autograd.gradcheck(otam_distance, (d[0, 0],))
