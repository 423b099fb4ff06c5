"""``nonnegative_qp``: a hand case and the KKT conditions on singular problems."""

from __future__ import annotations

import numpy as np
import pytest

from polytask.balancing.solvers import (
    nonnegative_qp,
)


def test_nonnegative_qp_hand_case() -> None:
    # min ½(2x² + 2y²) - 2x + 4y over x, y >= 0: unconstrained optimum (1, -2) -> y = 0, x = 1
    x = nonnegative_qp(np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([-2.0, 4.0]))
    np.testing.assert_allclose(x, [1.0, 0.0])


@pytest.mark.parametrize("seed", range(5))
def test_nonnegative_qp_kkt_on_singular_problems(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((12, 3))
    q = a @ a.T  # rank 3: singular
    c = q @ rng.standard_normal(12)  # in the range of Q: bounded below
    x = nonnegative_qp(q, c)
    grad = q @ x + c
    scale = np.abs(q).max()
    assert (x >= 0).all()
    assert grad.min() >= -1e-9 * scale
    assert np.abs(x * grad).max() <= 1e-9 * scale * max(1.0, x.max())
