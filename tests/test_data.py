"""Array sources: validation of .npy files, deterministic epochs, the held-out split, C."""

import numpy as np
import pytest

from jumprelu.config import ConfigError, base_config
from jumprelu.data import ArraySource, DataError, estimate_scale, load_npy, open_source, synthetic


def test_npy_validation_names_the_file(tmp_path):
    cases = {
        "flat.npy": (np.zeros(10, np.float32), "expected shape \\[N, d_model\\]"),
        "cube.npy": (np.zeros((2, 3, 4), np.float32), "found \\[2, 3, 4\\]"),
        "ints.npy": (np.zeros((4, 3), np.int32), "dtype int32"),
    }
    nan = np.ones((10, 3), np.float32)
    nan[7, 1] = np.nan
    nan[8, 0] = np.inf
    cases["nan.npy"] = (nan, "2 rows hold NaN or Inf \\(first at row 7\\)")
    for name, (arr, msg) in cases.items():
        path = tmp_path / name
        np.save(path, arr)
        with pytest.raises(DataError, match=msg) as e:
            load_npy(str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="no such file"):
        load_npy(str(tmp_path / "missing.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="not a readable .npy"):
        load_npy(str(tmp_path / "junk.npy"))


def test_epochs_visit_every_training_row_once_and_never_eval_rows():
    rows = np.arange(100, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    src = ArraySource(rows, eval_rows=20, seed=3, name="t")
    assert set(src.eval_index).isdisjoint(src.train_index)
    # 80 training rows, batch 16: 5 batches an epoch.
    epoch0 = np.concatenate([src.batch(k, 16)[:, 0] for k in range(5)])
    epoch1 = np.concatenate([src.batch(k, 16)[:, 0] for k in range(5, 10)])
    assert sorted(epoch0) == sorted(rows[src.train_index, 0]) == sorted(epoch1)
    assert not np.array_equal(epoch0, epoch1)  # a fresh order each epoch
    # A batch straddling the epoch boundary (batch 24 over 80 rows).
    straddle = src.batch(3, 24)[:, 0]
    assert len(set(straddle[:8])) == 8 and len(set(straddle[8:])) == 16


def test_batches_are_a_pure_function_of_step_and_seed():
    rows = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    a = ArraySource(rows, eval_rows=10, seed=1, name="t")
    b = ArraySource(rows, eval_rows=10, seed=1, name="t")
    c = ArraySource(rows, eval_rows=10, seed=2, name="t")
    np.testing.assert_array_equal(a.batch(7, 32), b.batch(7, 32))  # fresh object, same batch
    assert not np.array_equal(a.batch(7, 32), c.batch(7, 32))


def test_scale_estimate_normalises_mean_squared_norm():
    x = np.random.default_rng(0).standard_normal((5000, 16)).astype(np.float32) * 4.0
    c = estimate_scale(x)
    np.testing.assert_allclose(np.mean(np.sum((x / c) ** 2, axis=1)), 1.0, rtol=1e-5)


def test_d_model_mismatch_and_unknown_source(tmp_path):
    path = tmp_path / "acts.npy"
    np.save(path, np.ones((50, 6), np.float16))
    cfg = base_config().data
    cfg.source, cfg.eval_rows = str(path), 10
    assert open_source(cfg).d_model == 6
    cfg.d_model = 7
    with pytest.raises(ConfigError, match="data.d_model is 7 but data.source .*acts.npy has d_model 6"):
        open_source(cfg)
    cfg.source = "acts.parquet"
    with pytest.raises(ConfigError, match="data.source"):
        open_source(cfg)


def test_synthetic_data_has_the_requested_statistics():
    spec = synthetic.SyntheticSpec(
        d_model=32, num_features=64, rows=20000, features_per_token=4.0, noise_std=0.0, mean_norm=0.0
    )
    p = synthetic.firing_probabilities(spec)
    np.testing.assert_allclose(p.sum(), 4.0, rtol=1e-6)
    assert p[0] > p[10] > p[-1]  # power law: common head, rare tail
    x = synthetic.generate(spec)
    dirs = synthetic.true_directions(spec)
    assert x.shape == (20000, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x, synthetic.generate(spec))  # deterministic
    assert synthetic.features_recovered(dirs, dirs) == 1.0
    assert synthetic.features_recovered(-dirs, dirs) == 0.0
