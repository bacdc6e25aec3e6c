"""The fidelity benchmark's held-out split: random rows, or whole text windows never trained on."""

import importlib.util
import os

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location(
    "fidelity", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "fidelity.py")
)
fidelity = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(fidelity)


def test_random_rows_split_is_the_seeded_permutation():
    eval_idx, train_idx = fidelity.held_out(1000, 100, seed=3)
    perm = np.random.default_rng(3).permutation(1000)
    np.testing.assert_array_equal(eval_idx, np.sort(perm[:100]))
    np.testing.assert_array_equal(train_idx, np.sort(perm[100:]))


@pytest.mark.parametrize("seed", [0, 28])  # seed 28 holds out the short last block
def test_window_split_holds_out_whole_blocks_that_training_never_touches(seed):
    n, eval_rows, w = 1000, 90, 32  # the last block is short (1000 = 31·32 + 8)
    eval_idx, train_idx = fidelity.held_out(n, eval_rows, seed=seed, window_rows=w)
    assert eval_idx.size == eval_rows and np.all(np.diff(eval_idx) > 0)
    assert not set(eval_idx // w) & set(train_idx // w)  # no window on both sides
    dropped = n - eval_idx.size - train_idx.size
    assert 0 <= dropped < w  # only the unused rest of the last held-out block
    assert np.intersect1d(eval_idx, train_idx).size == 0
    again, _ = fidelity.held_out(n, eval_rows, seed=seed, window_rows=w)
    np.testing.assert_array_equal(eval_idx, again)
