"""The activation store: writer round trip, atomic shards, resumed writes, reader validation."""

import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from jumprelu.errors import DataError
from jumprelu.store import FORMAT_VERSION, StoreWriter, open_store
from jumprelu.store.convert import convert
from tests.test_train import ROOT


def _rows(n, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32) * 3


def _write(path, rows, **kw):
    w = StoreWriter(str(path), d_model=rows.shape[1], **kw)
    for start in range(0, len(rows), 37):  # chunks that do not line up with shards
        w.append(rows[start : start + 37])
    return w.close()


def _all_rows(store):
    return np.concatenate([np.asarray(store.shard(i)) for i in range(len(store.shard_rows))])


def _sorted(a):
    return a[np.lexsort(a.T[::-1])]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    rows = _rows(1000)
    meta = _write(tmp_path / "s", rows, dtype=dtype, shard_rows=300, model="m", site="resid_post", layer=3)
    store = open_store(str(tmp_path / "s"))
    assert store.shard_rows == [300, 300, 300, 100] and store.num_rows == 1000 and meta["num_rows"] == 1000
    assert (store.d_model, store.dtype, meta["format_version"], meta["layer"]) == (8, dtype, FORMAT_VERSION, 3)
    back = _all_rows(store)
    want = rows.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else rows
    assert back.dtype == want.dtype
    # Shuffled within shards at write time; the same multiset of rows, bit for bit.
    np.testing.assert_array_equal(
        _sorted(back.view(np.uint16 if dtype == "bfloat16" else np.uint32)),
        _sorted(want.view(np.uint16 if dtype == "bfloat16" else np.uint32)),
    )
    assert not np.array_equal(back, want)
    np.testing.assert_allclose(store.scale, np.sqrt(np.mean(np.sum(want.astype(np.float64) ** 2, 1))), rtol=1e-6)


def test_unshuffled_store_keeps_order(tmp_path):
    rows = _rows(500)
    _write(tmp_path / "s", rows, shuffle_seed=None, shard_rows=128)
    np.testing.assert_array_equal(_all_rows(open_store(str(tmp_path / "s"))), rows)


class _Crash(Exception):
    pass


def test_interrupted_write_resumes_without_loss_or_duplicates(tmp_path, monkeypatch):
    rows = _rows(1000)
    path = str(tmp_path / "s")
    w = StoreWriter(path, d_model=8, shard_rows=300)
    real_replace = os.replace
    calls = {"n": 0}

    def crash_on_third_shard(src, dst):  # dies after the temp file of shard 2 is written, before its rename
        if dst.endswith("shard-00002.npy"):
            raise _Crash()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_third_shard)
    with pytest.raises(_Crash):
        for start in range(0, 1000, 100):
            w.append(rows[start : start + 100])
            calls["n"] += 1
    monkeypatch.setattr(os, "replace", real_replace)
    # The reader says exactly what is incomplete.
    with pytest.raises(
        DataError,
        match=r"incomplete: the writer stopped after 2 complete shards \(last: "
        r"shard-00001.npy\); shard-00002.npy was being written; run the writer again",
    ) as e:
        open_store(path)
    assert "\n" not in str(e.value)
    # A new writer with the same settings picks up at the first uncommitted row.
    w2 = StoreWriter(path, d_model=8, shard_rows=300)
    assert w2.rows_written == 600
    w2.append(rows[600:])
    w2.close()
    store = open_store(path)
    assert store.num_rows == 1000 and sorted(os.listdir(path)) == [
        "metadata.json",
        "shard-00000.npy",
        "shard-00001.npy",
        "shard-00002.npy",
        "shard-00003.npy",
    ]
    np.testing.assert_array_equal(_sorted(_all_rows(store)), _sorted(rows))
    with pytest.raises(DataError, match="already complete"):
        StoreWriter(path, d_model=8)


def test_resuming_with_other_settings_is_refused(tmp_path):
    w = StoreWriter(str(tmp_path / "s"), d_model=8, shard_rows=10)
    w.append(_rows(25))
    with pytest.raises(DataError, match="interrupted write with dtype='float32' .* this writer has dtype='bfloat16'"):
        StoreWriter(str(tmp_path / "s"), d_model=8, shard_rows=10, dtype="bfloat16")


def test_resuming_with_the_same_tuple_and_numpy_settings_works(tmp_path):
    """writing.json reads tuples back as lists: the same settings were refused as other ones."""
    settings = dict(d_model=8, shard_rows=10, layer=np.int64(3), extra={"layers": (1, 2)}, shuffle_seed=None)
    w = StoreWriter(str(tmp_path / "s"), **settings)
    w.append(_rows(25))
    del w  # interrupted: 20 rows in two shards
    w = StoreWriter(str(tmp_path / "s"), **settings)
    w.append(_rows(25)[20:])
    w.close()
    store = open_store(str(tmp_path / "s"))
    np.testing.assert_array_equal(_all_rows(store), _rows(25))
    assert store.metadata["layer"] == 3 and store.metadata["extra"]["layers"] == [1, 2]
    with pytest.raises(DataError, match="store .*t: the writer's settings must be JSON values"):
        StoreWriter(str(tmp_path / "t"), d_model=8, extra={"x": object()})
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("store_dtype", ["bfloat16", "float32"])
def test_writer_takes_bfloat16_rows(tmp_path, store_dtype):
    rows = _rows(12).astype(ml_dtypes.bfloat16)
    _write(tmp_path / "s", rows, dtype=store_dtype, shuffle_seed=None)
    got = _all_rows(open_store(str(tmp_path / "s")))
    np.testing.assert_array_equal(np.asarray(got, np.float32), rows.astype(np.float32))


def test_writer_rejects_bad_rows(tmp_path):
    w = StoreWriter(str(tmp_path / "s"), d_model=8)
    with pytest.raises(DataError, match=r"rows must have shape \[n, 8\], found \[3, 7\]"):
        w.append(np.zeros((3, 7), np.float32))
    with pytest.raises(DataError, match="floating point, found dtype int64"):
        w.append(np.zeros((3, 8), np.int64))
    with pytest.raises(DataError, match="no rows were written"):
        w.close()
    # an audit: float64 beyond float32's range was stored as Inf (a NumPy warning, then a later error
    # naming the row's shuffled position)
    big = np.zeros((5, 8))
    big[3, 5] = 1e300
    w = StoreWriter(str(tmp_path / "t"), d_model=8)
    w.append(np.zeros((2, 8)))
    with pytest.raises(DataError, match=r"row 5, column 5 holds 1e\+300, beyond the float32 range .*stored as Inf$"):
        w.append(big)


def test_a_format_1_store_with_a_checksum_field_reads_unverified(tmp_path):
    """An audit: metadata checks checksums from format 2 on, but the reader used a format-1 store's
    checksum field anyway (a KeyError traceback when its shards had no crc32 lists)."""
    path = _good_store(tmp_path)
    meta = json.loads((path / "metadata.json").read_text())
    for s in meta["shards"]:
        del s["crc32"]
    meta["format_version"] = 1
    (path / "metadata.json").write_text(json.dumps(meta))
    store = open_store(str(path), verify=True)
    assert not store.checksummed and store.shard(0).shape == (40, 8)


def _good_store(tmp_path, **kw):
    path = tmp_path / "s"
    _write(path, _rows(100), shard_rows=40, **kw)
    return path


def _edit_metadata(path, **changes):
    meta = json.loads((path / "metadata.json").read_text())
    meta.update(changes)
    (path / "metadata.json").write_text(json.dumps(meta))


def test_reader_names_every_bad_input(tmp_path):
    path = _good_store(tmp_path)
    cases = []

    def expect(message):
        with pytest.raises(DataError, match=message) as e:
            open_store(str(path))
        assert "\n" not in str(e.value) and str(path) in str(e.value)
        cases.append(message)

    shard1 = path / "shard-00001.npy"
    data = shard1.read_bytes()
    shard1.write_bytes(data[:-10])
    expect(r"shard-00001.npy is truncated or damaged: expected \d+ bytes, found \d+")
    shard1.unlink()
    expect(r"shard-00001.npy is missing \(metadata.json lists 3 shards\)")
    shard1.write_bytes(data)
    np.save(path / "shard-00002.npy", np.zeros((20, 9), np.float32))
    expect(r"shard-00002.npy holds \[20, 9\] float32, metadata.json says \[20, 8\] float32")
    np.save(path / "shard-00002.npy", np.zeros((20, 8), np.float32))
    _edit_metadata(path, format_version=99)
    expect("metadata.json has format_version 99; this jumprelu reads versions 1, 2")
    _edit_metadata(path, format_version=FORMAT_VERSION, num_rows=7)
    expect("num_rows 7 is not the sum")
    (path / "metadata.json").write_text("{not json")
    expect("metadata.json is not readable JSON")
    (path / "metadata.json").unlink()
    expect(r"not an activation store \(metadata.json missing\)")
    with pytest.raises(DataError, match="no such directory"):
        open_store(str(tmp_path / "nowhere"))
    np.save(tmp_path / "acts.npy", np.ones((4, 3), np.float32))  # an audit: called "no such directory"
    with pytest.raises(DataError, match=r"acts.npy: is a file; a store is a directory \(convert an .npy with"):
        open_store(str(tmp_path / "acts.npy"))
    assert len(cases) == 7


def test_nonfinite_rows_fail_or_are_dropped(tmp_path):
    rows = _rows(100)
    rows[[5, 50, 51]] = np.nan
    rows[70, 2] = np.inf
    _write(tmp_path / "s", rows, shard_rows=40, shuffle_seed=None)
    with pytest.raises(
        DataError,
        match=r"4 rows hold NaN or Inf \(first: shard-00000.npy row 5, 1 there\); "
        "set data.nonfinite='drop'",
    ):
        open_store(str(tmp_path / "s"))
    store = open_store(str(tmp_path / "s"), nonfinite="drop")
    assert [b.tolist() for b in store.bad_rows] == [[5], [10, 11, 30], []]
    finite = rows[np.isfinite(rows).all(1)]
    np.testing.assert_allclose(store.scale, np.sqrt(np.mean(np.sum(finite.astype(np.float64) ** 2, 1))))


def _damage(path, shard, row, value):
    rows = np.load(path / shard, mmap_mode="r+")
    rows[row, 0] = value
    rows.flush()


def test_verify_finds_rows_damaged_after_writing(tmp_path):
    path = _good_store(tmp_path, shuffle_seed=None)
    _damage(path, "shard-00001.npy", 3, np.nan)
    assert open_store(str(path)).bad_rows[1].size == 0  # metadata alone does not know
    with pytest.raises(DataError, match=r"shard-00001.npy rows 0-39 do not match their checksum"):
        open_store(str(path), verify=True)


def test_convert_and_summary_commands(tmp_path):
    rows = _rows(3000, d=16).astype(np.float16)
    np.save(tmp_path / "acts.npy", rows)
    cmd = [sys.executable, "-m", "jumprelu", "store"]
    out = subprocess.run(
        cmd
        + [
            "convert",
            str(tmp_path / "acts.npy"),
            str(tmp_path / "s"),
            "--shard_rows=1000",
            "--model=tiny",
            "--site=resid_post",
            "--layer=2",
            "--dtype=bfloat16",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    s = subprocess.run(
        cmd + ["summary", str(tmp_path / "s"), "--verify", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert s.returncode == 0, s.stderr
    info = json.loads(s.stdout)
    assert (info["num_rows"], info["shards"], info["d_model"], info["dtype"]) == (3000, 3, 16, "bfloat16")
    assert (info["model"], info["layer"], info["nonfinite_rows"]) == ("tiny", 2, 0)
    back = _all_rows(open_store(str(tmp_path / "s")))
    want = rows.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(_sorted(back.astype(np.float32)), _sorted(want))
    assert info["checksums"].endswith(": every block checked")
    # an audit: without --verify no checksum was read, and a store with a flipped byte read as fine;
    # it now samples blocks as a training start does (here all three) and says how much it checked
    _flip_byte(tmp_path / "s" / "shard-00001.npy")
    quick = subprocess.run(cmd + ["summary", str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True)
    assert quick.returncode == 2 and "shard-00001.npy" in quick.stderr and "checksum" in quick.stderr, quick.stderr
    _flip_byte(tmp_path / "s" / "shard-00001.npy")  # back as it was
    quick = subprocess.run(cmd + ["summary", str(tmp_path / "s")], cwd=ROOT, capture_output=True, text=True)
    assert "up to 4 sampled blocks checked (--verify reads every row)" in quick.stdout, quick.stdout
    bad = subprocess.run(cmd + ["summary", str(tmp_path / "nowhere")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"jumprelu: error: store {tmp_path / 'nowhere'}: no such directory"


def _flip_byte(file, offset_from_end=100):
    """Flips one bit of a shard's data so that its values stay finite (a mantissa bit)."""
    data = bytearray(file.read_bytes())
    data[-offset_from_end] ^= 0x01
    file.write_bytes(bytes(data))


def test_flipped_byte_is_caught_by_verify_and_at_open(tmp_path):
    """Issue 15, item 2: changed bytes in a shard with a valid header are an error naming shard and rows."""
    path = _good_store(tmp_path, shuffle_seed=None)  # shards of 40, 40, 20 rows of 8 floats
    _flip_byte(path / "shard-00001.npy")
    assert np.isfinite(_all_rows(open_store(str(path)))).all()  # still finite: only checksums can tell
    message = r"shard-00001.npy rows 0-39 do not match their checksum \(crc32 [0-9a-f]{8}, metadata.json records"
    with pytest.raises(DataError, match=message) as e:
        open_store(str(path), verify=True)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=message):
        open_store(str(path), sample_blocks=3)  # the start-up check: 3 blocks is all of them here
    # ...and when training reads the rows, whatever the start's sample drew (it was only by chance)
    from jumprelu.data.stream import BatchStream

    store = open_store(str(path), sample_blocks=0)
    np.testing.assert_array_equal(store.rows(0, 3, 7), store.shard(0)[3:7])  # an intact block reads
    stream = BatchStream(store, eval_rows=10, seed=0, block_rows=10)
    with pytest.raises(DataError, match=message):
        for step in range(10):  # the 90 training rows: shard 1's come within the first batches
            stream.batch(step, 9)
    cmd = [sys.executable, "-m", "jumprelu", "store", "summary", str(path), "--verify"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "shard-00001.npy rows 0-39 do not match their checksum" in r.stderr


def test_a_shard_truncated_while_in_use_is_an_error_not_sigbus(tmp_path):
    """A shard cut short under a running job: reading pages past the new end of a memory map kills
    the process with SIGBUS (no message, no exit code of our own), so the reader checks the file's
    size before each read. Run in a child so that the old behaviour fails this test, not pytest."""
    path = tmp_path / "s"
    _write(path, _rows(1000, d=64), shard_rows=400)  # 100 KiB shards: many pages each
    script = textwrap.dedent(
        f"""
        import os
        from jumprelu.errors import DataError
        from jumprelu.store import open_store

        store = open_store({str(path)!r}, sample_blocks=0)
        assert store.rows(0, 0, 10).shape == (10, 64)  # mapped, its first block verified
        assert store.rows(0, 390, 400).sum() != 0  # ...and its last
        for index in (0, 1):  # shard 0 is mapped; shard 1 is not yet
            os.truncate(os.path.join({str(path)!r}, f"shard-0000{{index}}.npy"), 200)
            try:
                print("read", float(store.rows(index, 390, 400).sum()))
            except DataError as e:
                print("error", e)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # -7 (SIGBUS) before the check
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error store ") for line in lines), r.stdout
    assert "shard-00000.npy is now 200 bytes, 102528 when this process mapped it: the shard was truncated" in lines[0]
    assert "shard-00001.npy can no longer be read (" in lines[1] and "changed after the store was opened" in lines[1]


def _as_format_1(path):
    """Turns a store into what a jumprelu without checksums wrote."""
    meta = json.loads((path / "metadata.json").read_text())
    meta["format_version"] = 1
    del meta["checksum"]
    for s in meta["shards"]:
        del s["crc32"]
    (path / "metadata.json").write_text(json.dumps(meta))


def test_format_1_store_loads_unverified_and_verify_counts_nan(tmp_path, caplog):
    path = _good_store(tmp_path, shuffle_seed=None)
    _as_format_1(path)
    assert open_store(str(path)).num_rows == 100  # old stores still load
    with caplog.at_level("WARNING", logger="jumprelu"):
        open_store(str(path), sample_blocks=4)
        open_store(str(path), sample_blocks=4)
    assert [r.getMessage() for r in caplog.records if "records no checksums" in r.getMessage()] == [
        f"store {path} has format_version 1, which records no checksums: its rows cannot be verified "
        "(write it again with this jumprelu to protect it)"
    ]  # once per store
    _damage(path, "shard-00002.npy", 7, np.inf)
    with pytest.raises(
        DataError,
        match=r"shard-00002.npy holds 1 rows with NaN or Inf \(first: row 7\) where metadata.json records 0",
    ):
        open_store(str(path), nonfinite="drop", verify=True)  # a disagreement is an error whatever the policy


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: [m], "metadata.json must hold a JSON object, found list"),
        (lambda m: dict(m, d_model="8"), "field d_model must be a positive integer, found '8'"),
        (lambda m: dict(m, scale=-1.0), "field scale must be a finite number > 0, found -1.0"),
        (lambda m: dict(m, shards={}), "field shards must be a non-empty list, found {}"),
        (lambda m: dict(m, layer="3"), "field layer must be an integer or null, found '3'"),
        (lambda m: {**m, "shards": [dict(m["shards"][0], rows="40")]}, r"field shards\[0\].rows must be an integer"),
        (lambda m: {**m, "shards": [dict(m["shards"][0], file="../x.npy")]}, r"field shards\[0\].file must be"),
        (lambda m: {**m, "shards": [dict(m["shards"][0], nonfinite_rows=[40])]}, r"shards\[0\].nonfinite_rows"),
        (lambda m: {**m, "shards": [dict(m["shards"][0], crc32=[])]}, r"shards\[0\].crc32 must be a list of 1"),
        (lambda m: dict(m, checksum=None), "field checksum must be"),
    ],
)
def test_metadata_of_the_wrong_type_is_one_line(tmp_path, edit, message):
    """Issue 15, item 7: metadata.json that is valid JSON of the wrong type."""
    path = _good_store(tmp_path)
    (path / "metadata.json").write_text(json.dumps(edit(json.loads((path / "metadata.json").read_text()))))
    with pytest.raises(DataError, match=message) as e:
        open_store(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_full_disk_during_a_write_is_one_line_and_resumes(tmp_path, monkeypatch):
    """Issue 15, item 7: no space left while writing a shard; the same write resumes once there is space."""
    import errno

    from jumprelu.store import convert as convert_lib
    from jumprelu.store import writer as writer_lib

    rows = _rows(100)
    np.save(tmp_path / "acts.npy", rows)
    real_sink = writer_lib._Sink

    class FullDisk(real_sink):  # the second shard's file fills the disk after a few bytes
        def __init__(self, f):
            super().__init__(f)
            self.file = f
            if f.name.endswith(".shard-00001.npy.tmp"):
                self.write = self.fail

        def fail(self, data):
            self.file.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer_lib, "_Sink", FullDisk)
    out = tmp_path / "s"
    with pytest.raises(
        DataError,
        match=r"store .*s: cannot write shard-00001.npy: No space left on device; free some space and run the same",
    ) as e:
        convert_lib.convert(str(tmp_path / "acts.npy"), str(out), shard_rows=40, log=lambda *_: None)
    assert "\n" not in str(e.value)
    # the partial shard is given back (the lock is this process's until its writer is replaced)
    assert sorted(os.listdir(out)) == [".writer.lock", "shard-00000.npy", "writing.json"]
    monkeypatch.setattr(writer_lib, "_Sink", real_sink)
    convert_lib.convert(str(tmp_path / "acts.npy"), str(out), shard_rows=40, log=lambda *_: None)
    np.testing.assert_array_equal(_sorted(_all_rows(open_store(str(out), verify=True))), _sorted(rows))
    # Killed after metadata.json but before the progress file went (found by benchmarks/chaos.py):
    # the same command finishes as a no-op; other settings are still refused.
    (out / "writing.json").write_text("{}")
    assert (
        convert_lib.convert(str(tmp_path / "acts.npy"), str(out), shard_rows=40, log=lambda *_: None)["num_rows"] == 100
    )
    assert not (out / "writing.json").exists()
    with pytest.raises(DataError, match="already complete"):
        convert_lib.convert(str(tmp_path / "acts.npy"), str(out), shard_rows=40, dtype="bfloat16", log=lambda *_: None)
    # The input regenerated at the same path (same shape, other rows): not "already converted"...
    np.save(tmp_path / "acts.npy", rows * 50)
    with pytest.raises(DataError, match=r"store .*s was converted from another version of this input"):
        convert_lib.convert(str(tmp_path / "acts.npy"), str(out), shard_rows=40, log=lambda *_: None)
    # ...and an interrupted conversion does not resume with it
    monkeypatch.setattr(writer_lib, "_Sink", FullDisk)
    with pytest.raises(DataError, match="No space left"):
        convert_lib.convert(str(tmp_path / "acts.npy"), str(tmp_path / "t"), shard_rows=40, log=lambda *_: None)
    monkeypatch.setattr(writer_lib, "_Sink", real_sink)
    np.save(tmp_path / "acts.npy", rows)
    with pytest.raises(DataError, match=r"interrupted write with extra=.* is in progress"):
        convert_lib.convert(str(tmp_path / "acts.npy"), str(tmp_path / "t"), shard_rows=40, log=lambda *_: None)


def test_convert_names_an_npz_archive(tmp_path):
    """np.savez's archive is not one array: a one-line error listing its arrays, not a traceback."""
    from jumprelu.store.npy import open_npy

    np.savez(tmp_path / "acts.npz", acts=np.zeros((4, 8), np.float32))
    message = r"acts.npz: expected a .npy of one array \[N, d_model\], found a .npz archive of \['acts'\]"
    with pytest.raises(DataError, match=message):
        open_npy(str(tmp_path / "acts.npz"))
    (tmp_path / "text.npy").write_text("step,loss\n1,0.5\n")  # NumPy would call it pickled data
    with pytest.raises(DataError, match=r"text.npy: not a .npy file \(it does not start with the .npy header\)$"):
        open_npy(str(tmp_path / "text.npy"))


def test_convert_names_a_bfloat16_npy_that_lost_its_dtype(tmp_path):
    """np.save writes ml_dtypes' bfloat16 as raw 2-byte values ('<V2'): the error says so and how to
    save it, rather than calling the activations a dtype nobody wrote."""
    import ml_dtypes

    from jumprelu.store.npy import open_npy

    np.save(tmp_path / "acts.npy", np.ones((4, 8), ml_dtypes.bfloat16))
    with pytest.raises(DataError, match=r"acts.npy: .*raw 2-byte values .*bfloat16 array; save it as float32"):
        open_npy(str(tmp_path / "acts.npy"))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("shard_rows", -5, "shard_rows must be a positive integer, found -5"),
        ("shuffle_seed", -1, "shuffle_seed must be an integer >= 0"),
    ],
)
def test_writer_refuses_bad_shard_rows_and_seed_before_writing(tmp_path, field, value, message):
    """A numpy traceback before, and a writing.json naming the bad value that refused the rerun."""
    with pytest.raises(DataError, match=message):
        StoreWriter(str(tmp_path / "s"), d_model=8, **{field: value})
    assert not (tmp_path / "s").exists()


def test_a_store_is_not_written_among_another_directory_s_files(tmp_path):
    """Found by an audit: `store convert` into a training workdir wrote shards beside its checkpoints."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    np.save(tmp_path / "a.npy", np.ones((8, 4), np.float32))
    with pytest.raises(DataError, match="run: holds 'checkpoints', which is no store's; write a store into a new"):
        convert(str(tmp_path / "a.npy"), str(run))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json"]
    (tmp_path / "empty").mkdir()
    convert(str(tmp_path / "a.npy"), str(tmp_path / "empty"))  # an empty directory is fine
    # a write that crashed while publishing its metadata, on a new disk's root, resumes
    crashed = tmp_path / "crashed"
    w = StoreWriter(str(crashed), d_model=4, shard_rows=4)
    w.append(np.ones((8, 4), np.float32))
    w._lock.release()  # the process died here
    (crashed / "metadata.json.tmp").write_text("{")
    (crashed / "lost+found").mkdir()
    w = StoreWriter(str(crashed), d_model=4, shard_rows=4)
    assert w.rows_written == 8
    w.close()
    assert open_store(str(crashed)).num_rows == 8


def test_the_shard_buffer_grows_with_the_rows_not_with_shard_rows(tmp_path):
    """A huge --shard_rows on a small input allocated the whole shard (a MemoryError traceback,
    then a write in progress that refused the corrected rerun); the buffer now grows as rows come."""
    _write(tmp_path / "huge", _rows(3), shard_rows=10**12)
    np.testing.assert_array_equal(_sorted(_all_rows(open_store(str(tmp_path / "huge")))), _sorted(_rows(3)))
    rows = _rows(10_000)  # grown past its first 4,096 rows, twice, then flushed at 9,000
    _write(tmp_path / "grown", rows, shard_rows=9_000, shuffle_seed=None)
    store = open_store(str(tmp_path / "grown"))
    assert list(store.shard_rows) == [9_000, 1_000]
    np.testing.assert_array_equal(_all_rows(store), rows)


def test_a_short_write_of_a_real_file_keeps_its_reason(tmp_path):
    """A write the kernel cuts short (here RLIMIT_FSIZE, as a full disk does with ENOSPC) names its
    reason: numpy's tofile path said only "N requested and M written", so the full-disk hint was lost."""
    np.save(tmp_path / "acts.npy", _rows(200, d=64))  # 25,600-byte shards
    script = textwrap.dedent(
        f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))
        from jumprelu.errors import DataError
        from jumprelu.store.convert import convert
        try:
            convert({str(tmp_path / "acts.npy")!r}, {str(tmp_path / "s")!r}, shard_rows=100, log=lambda *_: None)
        except DataError as e:
            print(e)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "cannot write shard-00000.npy: File too large" in out.stdout, out.stdout + out.stderr


def test_a_one_process_and_a_part_writer_cannot_both_complete_one_store(tmp_path):
    """The two kinds of writer hold different locks: both could pass the check for the other's
    write, and the later metadata.json replaced the earlier, orphaning its committed rows. The
    check now runs under a lock on the directory, and metadata.json is never replaced."""
    import threading
    import time

    from jumprelu.store.lock import layout_lock

    path = tmp_path / "s"
    path.mkdir()
    held, release = threading.Event(), threading.Event()

    def hold():
        with layout_lock(str(path)):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    writer = StoreWriter(str(path), d_model=8, shard_rows=40)  # waits for the check to be its own
    assert time.monotonic() - started >= 0.4
    holder.join()
    writer.append(_rows(50))
    with pytest.raises(DataError, match="a one-process write is in progress here"):
        StoreWriter(str(path), d_model=8, shard_rows=40, part=0, parts=1)
    (path / "metadata.json").write_text('{"theirs": true}')  # another writer completed it meanwhile
    with pytest.raises(DataError, match="another writer completed this store .metadata.json appeared. while this"):
        writer.close()
    assert json.loads((path / "metadata.json").read_text()) == {"theirs": True}
    assert not (path / "metadata.json.tmp").exists()


def test_runs_of_one_synthetic_spec_wait_for_the_run_writing_its_store(tmp_path):
    """gs:// workdirs share one temporary synthetic store per spec: a second run (a parallel
    sweep) failed on the writer lock; it now waits, then resumes or reuses the store."""
    import dataclasses
    import threading

    from jumprelu.data.synthetic import SyntheticSpec, write_store

    spec = SyntheticSpec(d_model=8, num_features=16, rows=64)
    description = "synthetic " + json.dumps(dataclasses.asdict(spec), sort_keys=True)  # its header, as write_store's
    path = str(tmp_path / "syn")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom jumprelu.store import StoreWriter\n"
         f"w = StoreWriter({path!r}, d_model=8, model='synthetic', site='synthetic', text_source={description!r})\n"
         "print('ready', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(DataError, match="another process .* is writing this store"):
            write_store(spec, path, wait_s=0.5)  # a bounded wait
        threading.Timer(1.0, holder.kill).start()  # the writer dies: the waiting run takes over
        write_store(spec, path, wait_s=60)
    finally:
        holder.kill()
        holder.wait()
    assert open_store(path).num_rows == 64


def test_a_second_writer_on_one_store_is_refused_until_the_first_is_gone(tmp_path):
    """Two converts into one directory each deleted the other's new shards as crash leftovers and
    could mark the store complete with a shard missing: the second one is now refused at once."""
    from jumprelu.store.convert import convert

    path = str(tmp_path / "s")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nfrom jumprelu.store import StoreWriter\n"
         f"w = StoreWriter({path!r}, d_model=8, shard_rows=40)\nprint('ready', flush=True)\nsys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "ready"
        message = rf"store {path}: another process \(pid {holder.pid}\) is writing this store"
        with pytest.raises(DataError, match=message):
            StoreWriter(path, d_model=8, shard_rows=40)
    finally:
        holder.kill()
        holder.wait()
    writer = StoreWriter(path, d_model=8, shard_rows=40)  # the killed holder's lock is free
    writer.append(_rows(40))
    writer.close()
    assert sorted(os.listdir(path)) == ["metadata.json", "shard-00000.npy"]  # the lock file goes with the write
    np.save(tmp_path / "acts.npy", _rows(100))
    path = str(tmp_path / "t")
    convert(str(tmp_path / "acts.npy"), path, shard_rows=40, log=lambda *_: None)
    # A complete store that lost a shard is not "already converted".
    os.remove(os.path.join(path, "shard-00001.npy"))
    with pytest.raises(DataError, match=r"shard-00001.npy is missing \(metadata.json lists 3 shards\)"):
        convert(str(tmp_path / "acts.npy"), path, shard_rows=40, log=lambda *_: None)
    # ...nor one with a truncated shard (an audit: "nothing to do", then the error at the first read)
    convert(str(tmp_path / "acts.npy"), path + "_t", shard_rows=40, log=lambda *_: None)
    os.truncate(os.path.join(path + "_t", "shard-00001.npy"), 1000)
    with pytest.raises(DataError, match=r"shard-00001.npy is truncated or damaged: .*; convert into a new directory"):
        convert(str(tmp_path / "acts.npy"), path + "_t", shard_rows=40, log=lambda *_: None)


def test_a_committed_shard_damaged_before_the_resume_is_not_published(tmp_path):
    """An audit: a conversion resumed after a crash trusted the shards its record lists, so one truncated
    since was published in a store marked complete; now one line before any row is written."""
    path = tmp_path / "s"
    writer = StoreWriter(str(path), d_model=8, shard_rows=40)
    writer.append(_rows(90))  # two shards committed, then the process "dies"
    os.truncate(path / "shard-00001.npy", 300)
    with pytest.raises(DataError, match=r"shard-00001.npy, recorded as written in writing.json, is truncated or dam"):
        StoreWriter(str(path), d_model=8, shard_rows=40)
    assert not (path / "metadata.json").exists()


def test_a_damaged_progress_record_or_synthetic_metadata_is_one_line(tmp_path):
    from jumprelu.data.synthetic import SyntheticSpec, write_store

    path = tmp_path / "s"
    writer = StoreWriter(str(path), d_model=8, shard_rows=40)
    writer.append(_rows(50))  # one shard committed, then the process "dies"
    (path / "writing.json").write_text('{"header": {"model": "x", "d_mo')
    with pytest.raises(DataError, match=r"store .*s: writing.json \(the interrupted write's record\) is damaged"):
        StoreWriter(str(path), d_model=8, shard_rows=40)
    path = tmp_path / "s2"
    writer = StoreWriter(str(path), d_model=8, shard_rows=40)
    writer.append(_rows(50))
    record = json.loads((path / "writing.json").read_text())
    good = record["shards"][0]
    damaged = [  # (the entry, the field the error names)
        (["shard-00000.npy"], r"shards\[0\] must be an object"),
        ({**good, "file": 3}, r"shards\[0\]\.file must be a shard file name"),
        ({"file": "shard-00000.npy"}, r"shards\[0\]\.rows must be an integer >= 0 and <= 40"),
        ({**good, "rows": -5}, r"shards\[0\]\.rows must be an integer >= 0 and <= 40, found -5"),
        ({**good, "rows": 10**6}, r"shards\[0\]\.rows must be"),  # more rows than a shard holds
        ({**good, "file": "other.npy"}, r"shards\[0\]\.file must be 'shard-00000.npy', found 'other.npy'"),
        ({**good, "crc32": "x"}, r"shards\[0\]\.crc32 must be a list of 1 CRC-32"),
        ({k: v for k, v in good.items() if k != "sum_sq_norm"}, r"shards\[0\]\.sum_sq_norm must be a finite number"),
        ({k: v for k, v in good.items() if k != "nonfinite_rows"}, r"shards\[0\]\.nonfinite_rows must be a list"),
    ]
    for entry, field in damaged:
        (path / "writing.json").write_text(json.dumps({**record, "shards": [entry]}))
        with pytest.raises(DataError, match=r"writing.json .*is damaged \(" + field):
            StoreWriter(str(path), d_model=8, shard_rows=40)
    assert (path / "shard-00000.npy").exists()  # a wrong record never deletes the shard it names
    # a record from before checksums whose file is not a shard: one line, not numpy's ValueError
    old_style = {k: v for k, v in good.items() if k != "crc32"}
    (path / "shard-00000.npy").write_text("not an array")
    (path / "writing.json").write_text(json.dumps({**record, "shards": [old_style]}))
    with pytest.raises(DataError, match=r"shard-00000.npy, recorded as written in writing.json, is not a readable"):
        StoreWriter(str(path), d_model=8, shard_rows=40)
    # ...nor when the store is only read (was a TypeError / KeyError traceback)
    for shards in ("[1]", '{"a": 1}'):
        (path / "writing.json").write_text('{"header": {}, "shards": ' + shards + "}")
        with pytest.raises(DataError, match="incomplete, and its writing.json is unreadable"):
            open_store(str(path))

    spec = SyntheticSpec(d_model=8, num_features=16, rows=64)
    write_store(spec, str(tmp_path / "syn"))
    (tmp_path / "syn" / "metadata.json").write_text('{"format": "jumprelu-activation-store", "format_ver')
    with pytest.raises(DataError, match=r"syn.*metadata.json is not readable JSON"):
        write_store(spec, str(tmp_path / "syn"))


def test_converting_a_directory_says_it_is_one(tmp_path):
    """Found by an audit: `store convert DIR OUT` said "DIR: no such file"."""
    with pytest.raises(DataError, match=f"^{tmp_path}: a directory; expected a .npy file of activations"):
        convert(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "value, why", [(0.0, "all 60 finite rows are zero"), (np.nan, r"all 60 rows are non-finite \(NaN or Inf")]
)
def test_rows_with_no_scale_say_why_not_resume(tmp_path, value, why):
    """And leave nothing: an audit found the shards, writing.json and the lock of such a write
    kept, so `store convert` of the corrected .npy into the same folder was refused as "an
    interrupted write with text_source=... is in progress"."""
    writer = StoreWriter(str(tmp_path / "s"), d_model=8, shard_rows=40, text_source="bad.npy")
    writer.append(np.full((60, 8), value, np.float32))
    with pytest.raises(DataError, match=f"cannot compute the scale C: {why}.*; the shards written are removed$"):
        writer.close()
    assert list((tmp_path / "s").iterdir()) == []
    bad, good = tmp_path / "bad.npy", tmp_path / "good.npy"
    np.save(bad, np.full((60, 8), value, np.float32))
    np.save(good, np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32))
    from jumprelu.store.commit import commit_parts

    for part in range(2):  # a multi-process write (a pod's harvest) ends the same way at its commit
        writer = StoreWriter(str(tmp_path / "p"), d_model=8, shard_rows=40, part=part, parts=2)
        writer.append(np.full((60, 8), value, np.float32))
        writer.close()
    with pytest.raises(
        DataError, match=f"cannot compute the scale C: {why.replace('60', '120')}.*; the shards written"
    ):
        commit_parts(str(tmp_path / "p"), 2)
    assert list((tmp_path / "p").iterdir()) == []
    cmd = [sys.executable, "-m", "jumprelu", "store", "convert"]
    cli = subprocess.run([*cmd, str(bad), str(tmp_path / "c")], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "cannot compute the scale C" in cli.stderr
    cli = subprocess.run([*cmd, str(good), str(tmp_path / "c")], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert open_store(str(tmp_path / "c")).num_rows == 60
