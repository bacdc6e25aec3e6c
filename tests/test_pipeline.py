"""The training stream and its Grain pipeline: epochs, the held-out split, processes, resume."""

import numpy as np
import pytest

from jumprelu.config import ConfigError, base_config
from jumprelu.data import BatchStream, open_source, pipeline, synthetic
from jumprelu.store import StoreWriter, open_store


def _id_store(path, n=1000, shard_rows=128, dtype="float32"):
    """Row i holds the value i in every column, so a batch tells which rows it holds."""
    w = StoreWriter(str(path), d_model=4, shard_rows=shard_rows, dtype=dtype)
    w.append(np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, axis=1))
    w.close()
    return open_store(str(path))


def _ids(rows):
    return rows[:, 0].astype(np.int64)


def test_every_training_row_once_per_epoch_never_an_eval_row(tmp_path):
    stream = BatchStream(_id_store(tmp_path / "s"), eval_rows=100, seed=3, block_rows=16)
    held = _ids(stream.eval_set())
    assert len(held) == 100 and len(set(held)) == 100
    assert stream.num_train_rows == 900
    epoch0 = _ids(stream.read(0, 900))
    epoch1 = _ids(stream.read(900, 900))
    assert sorted(epoch0) == sorted(epoch1) == sorted(set(range(1000)) - set(held))
    assert not np.array_equal(epoch0, epoch1)  # a fresh order each epoch
    # Batches tile the stream without gaps, across the epoch boundary too (B = 64 ∤ 900).
    batches = np.concatenate([_ids(stream.batch(k, 64)) for k in range(30)])
    np.testing.assert_array_equal(batches, np.concatenate([epoch0, epoch1, _ids(stream.read(1800, 120))]))
    # Pieces come from all shards: the first 20 batches of 64 rows draw on every shard.
    shards = {i // 128 for i in _ids(stream.read(0, 20 * 64))}
    assert shards == set(range(8))


def test_order_depends_on_the_seed_and_nothing_else(tmp_path):
    store = _id_store(tmp_path / "s")
    a = BatchStream(store, eval_rows=50, seed=1, block_rows=8)
    b = BatchStream(open_store(str(tmp_path / "s")), eval_rows=50, seed=1, block_rows=8)
    c = BatchStream(store, eval_rows=50, seed=2, block_rows=8)
    np.testing.assert_array_equal(a.batch(7, 32), b.batch(7, 32))
    np.testing.assert_array_equal(a.eval_set(), b.eval_set())
    assert not np.array_equal(a.batch(7, 32), c.batch(7, 32))
    assert not np.array_equal(a.eval_set(), c.eval_set())


def test_two_processes_read_disjoint_halves_that_cover_the_epoch(tmp_path):
    stream = BatchStream(_id_store(tmp_path / "s", n=1064), eval_rows=40, seed=0, block_rows=16)  # 1024 train rows
    halves = [slice(0, 32), slice(32, 64)]  # what distributed.process_rows gives 2 processes at B = 64
    seen = []
    for part in halves:
        it = pipeline.batch_iterator(stream, batch_size=64, part=part, num_batches=16)
        seen.append(np.concatenate([_ids(next(it)) for _ in range(16)]))
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(np.concatenate(seen)) == sorted(_ids(stream.read(0, 1024)))


def test_dropped_nonfinite_rows_are_never_served(tmp_path):
    rows = np.repeat(np.arange(300, dtype=np.float32)[:, None], 4, axis=1)
    rows[[0, 17, 18, 299]] = np.nan
    w = StoreWriter(str(tmp_path / "s"), d_model=4, shard_rows=100, shuffle_seed=None)
    w.append(rows)
    w.close()
    stream = BatchStream(open_store(str(tmp_path / "s"), nonfinite="drop"), eval_rows=16, seed=0, block_rows=7)
    served = np.concatenate([stream.eval_set(), stream.read(0, stream.num_train_rows)])
    assert np.isfinite(served).all() and sorted(_ids(served)) == sorted(set(range(300)) - {0, 17, 18, 299})


def test_grain_iterator_serves_stream_batches_and_resumes_from_its_state(tmp_path):
    stream = BatchStream(_id_store(tmp_path / "s", dtype="bfloat16", n=256), eval_rows=0, seed=0, block_rows=4)
    it = pipeline.batch_iterator(stream, batch_size=24, part=slice(None), num_batches=40, read_threads=2)
    first = [next(it) for _ in range(10)]
    for k, b in enumerate(first):
        np.testing.assert_array_equal(b, stream.batch(k, 24))
    assert first[0].dtype == stream.store.shard(0).dtype  # bfloat16 travels as bfloat16
    saved = pipeline.IteratorSnapshot(it).get_state()
    rest = [next(it) for _ in range(30)]
    with pytest.raises(StopIteration):
        next(it)
    again = pipeline.batch_iterator(stream, batch_size=24, part=slice(None), num_batches=40)
    import json

    again.set_state(json.loads(saved))
    assert pipeline.next_index(again) == 10
    for want in rest:
        np.testing.assert_array_equal(next(again), want)


def test_open_source_checks_d_model_and_refuses_bare_npy(tmp_path):
    _id_store(tmp_path / "s")
    cfg = base_config().data
    cfg.source = str(tmp_path / "s")
    assert open_source(cfg, str(tmp_path)).d_model == 4
    cfg.d_model = 7
    with pytest.raises(ConfigError, match="data.d_model is 7 but data.source .* has d_model 4"):
        open_source(cfg, str(tmp_path))
    cfg.source, cfg.d_model = str(tmp_path / "acts.npy"), None
    with pytest.raises(ConfigError, match="convert it first: jumprelu store convert .*acts.npy STORE_DIR"):
        open_source(cfg, str(tmp_path))
    cfg.source, cfg.d_model = "synthtic", None  # misspelt: named with what it could be
    with pytest.raises(ConfigError, match=r"data.source is 'synthtic': no such directory; .* 'synthetic' or 'lm'"):
        open_source(cfg, str(tmp_path))
    cfg.source, cfg.d_model = "synthetic", 7  # refused before the synthetic rows are made, not after
    with pytest.raises(ConfigError, match=r"data.d_model is 7 but the synthetic rows have data.synthetic.d_model="):
        open_source(cfg, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_synthetic_source_is_written_once_through_the_store(tmp_path):
    cfg = base_config().data
    cfg.synthetic.update(d_model=8, num_features=16, rows=2000)
    store = open_source(cfg, str(tmp_path))
    assert store.path == str(tmp_path / "synthetic_store") and store.num_rows == 2000
    spec = synthetic.SyntheticSpec.from_config(cfg.synthetic)
    rows = synthetic.generate(spec)
    back = np.asarray(store.shard(0))
    np.testing.assert_array_equal(back[np.lexsort(back.T)], rows[np.lexsort(rows.T)])
    mtime = (tmp_path / "synthetic_store" / "shard-00000.npy").stat().st_mtime_ns
    open_source(cfg, str(tmp_path))  # reused, not rewritten
    assert (tmp_path / "synthetic_store" / "shard-00000.npy").stat().st_mtime_ns == mtime
    cfg.synthetic.seed = 5
    with pytest.raises(Exception, match="other data.synthetic settings"):
        open_source(cfg, str(tmp_path))


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
