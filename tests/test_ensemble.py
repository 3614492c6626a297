"""Fixed-order ensemble statistics: a column's value does not depend on the block it sits in."""

from __future__ import annotations

import pytest
import torch

from kernels import metrics
from kernels.assimilation import block_range, column_range
from kernels.ensemble import member_mean, member_sum, member_var


@pytest.mark.parametrize("n", [1, 2, 7, 8, 33])
def test_column_blocks_give_identical_statistics(n):
    g = torch.Generator().manual_seed(n)
    d = 50_003
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
    t = torch.randn(d, generator=g, dtype=torch.float64)
    m, v, c = member_mean(x), member_var(x), metrics.crps_ensemble(x, t)
    # narrow, unaligned and wide blocks: torch.sum(x, 0) rounds differently across these
    for a, b in [(0, 5), (5, d), (3, d - 1), (1, 2), (16384, 32768)]:
        xs = x[:, a:b].contiguous()
        assert torch.equal(member_mean(xs), m[a:b])
        assert torch.equal(member_var(xs), v[a:b])
        assert torch.equal(metrics.crps_ensemble(xs, t[a:b]), c[a:b])
    torch.testing.assert_close(m, x.mean(0), rtol=0, atol=1e-14)
    if n > 1:
        torch.testing.assert_close(v, x.var(0), rtol=1e-13, atol=1e-13)


def test_member_sum_edge_cases():
    assert torch.equal(member_sum(torch.zeros(0, 3)), torch.zeros(3))
    x = torch.arange(15.0).reshape(5, 3)
    assert torch.equal(member_sum(x), x.sum(0))


def test_block_and_column_ranges_cover_exactly():
    for total, parts in [(10, 3), (2, 4), (0, 2), (41, 3)]:
        got = [block_range(total, parts, i) for i in range(parts)]
        assert [j for r in got for j in r] == list(range(total))
        assert max(map(len, got)) - min(map(len, got)) <= 1
    for k, chunk, parts in [(41, 8, 3), (41, 16384, 4), (100, 7, 5)]:
        cols = [column_range(k, chunk, parts, i) for i in range(parts)]
        assert [j for r in cols for j in r] == list(range(k))
        assert all(r.start % chunk == 0 for r in cols if len(r))
