"""The model-independent half of the harvest: reading text, packing, masking, resumable collection."""

import contextlib
import json
import os
import signal

import numpy as np
import pytest

from jumprelu.errors import DataError
from jumprelu.harvest import collect as collect_lib
from jumprelu.harvest import text as text_lib
from jumprelu.harvest.tokenizer import SpecialIds
from jumprelu.store import StoreWriter, open_store
from tests.test_store import _all_rows

SPECIAL = SpecialIds(bos=2, eos=1, pad=0)


class CharTokenizer:
    """ids = byte + 4 (0-3 are pad, eos, bos, unk as in Gemma)."""

    special = SPECIAL

    def encode(self, text):
        return [b + 4 for b in text.encode()]


def _sources(tmp_path):
    (tmp_path / "a.txt").write_text("first doc.\n\nsecond paragraph")
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "json one", "id": 1}) + "\n\n")
        f.write(json.dumps({"text": "json two"}) + "\n")
    np.save(tmp_path / "c.npy", np.array([[40, 41, 0, 0], [42, 43, 44, 0]], np.int32))
    return [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.npy")]


def test_documents_in_every_format(tmp_path):
    docs = list(text_lib.iter_documents(_sources(tmp_path), split_paragraphs=True))
    assert docs[:4] == ["first doc.", "second paragraph", "json one", "json two"]
    np.testing.assert_array_equal(docs[4], [40, 41, 0, 0])
    assert len(docs) == 6


def test_packing_starts_every_sequence_with_bos_and_keeps_every_token_once(tmp_path):
    seqs = list(text_lib.sequences(_sources(tmp_path), CharTokenizer(), seq_len=8))
    assert all(s[0] == SPECIAL.bos and s.shape == (8,) for s in seqs)
    body = np.concatenate([s[1:] for s in seqs])
    stream = np.concatenate(
        list(text_lib.token_stream(text_lib.iter_documents(_sources(tmp_path)), CharTokenizer(), SPECIAL))
    )
    np.testing.assert_array_equal(body[: stream.size], stream)
    assert (body[stream.size :] == SPECIAL.pad).all() and body.size - stream.size < 7
    kept = sum(int(text_lib.keep_mask(s, SPECIAL).sum()) for s in seqs)
    assert kept == int(((stream != SPECIAL.eos) & (stream != SPECIAL.pad)).sum())  # rows = real tokens


@pytest.mark.parametrize(
    "content, message",
    [("{not json", "line 1: not JSON"), (json.dumps({"body": "x"}), "line 1: no string field 'text'")],
)
def test_bad_jsonl_is_named(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content + "\n")
    with pytest.raises(DataError, match=message):
        list(text_lib.iter_documents([str(tmp_path / "bad.jsonl")]))
    with pytest.raises(DataError, match="no such file"):
        list(text_lib.iter_documents([str(tmp_path / "absent.txt")]))


def test_bad_token_id_files_are_named_before_the_model_loads(tmp_path):
    """A pre-tokenised .npy was only read after the model loaded: a non-.npy was numpy's traceback,
    ids out of range were harvested (2**33 + 5 wrapped to 5 in int32)."""
    from jumprelu.experiments.harvest.gemma2 import get_config
    from jumprelu.harvest.checks import check_before_loading

    (tmp_path / "pickled.npy").write_bytes(b"not an array at all")
    np.save(tmp_path / "floats.npy", np.ones(5, np.float32))
    np.save(tmp_path / "negative.npy", np.array([5, -3, 8]))
    np.save(tmp_path / "huge.npy", np.array([5, 2**33 + 5, 8]))
    cfg = get_config("tiny=/unused,layer=1,site=resid")
    for name, message in [
        ("pickled.npy", r"pickled.npy: not a readable .npy of token ids \("),
        ("floats.npy", r"floats.npy: expected 1-D or 2-D integer token ids, found float32"),
        ("negative.npy", r"negative.npy: token ids must be in \[0, 2\^31\), found -3..8"),
        ("huge.npy", r"huge.npy: token ids must be in \[0, 2\^31\), found 5..8589934597"),
    ]:
        cfg.texts = (str(tmp_path / name),)
        with pytest.raises(DataError, match=message):
            check_before_loading(cfg)
    # in range for int32 but not for the tokenizer: named when it is reached
    np.save(tmp_path / "big.npy", np.array([5, 400, 8]))
    tok = CharTokenizer()
    tok.vocab_size = 320
    with pytest.raises(DataError, match="holds token id 400, outside the tokenizer's 320 ids"):
        list(text_lib.token_stream(text_lib.iter_documents([str(tmp_path / "big.npy")]), tok, SPECIAL))


def _fake_site(tokens):
    """A deterministic 'model': each position's activation depends on its token and position."""
    t = tokens.astype(np.float32)[..., None]
    pos = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.float32)[None, :, None], t.shape)
    return np.concatenate([t, pos, t * 0.5 + pos, np.sin(t + pos)], axis=-1)


def _harvest(tmp_path, name, batch_sequences, crash_after=None, texts=None):
    writer = StoreWriter(str(tmp_path / name), d_model=4, shard_rows=50, shuffle_seed=None)
    calls = {"n": 0}

    def site(tokens):
        calls["n"] += 1
        if crash_after is not None and calls["n"] > crash_after:
            raise KeyboardInterrupt("killed")
        return [_fake_site(tokens)]

    seqs = text_lib.sequences(texts, CharTokenizer(), seq_len=16)
    return collect_lib.collect(seqs, site, [writer], SPECIAL, batch_sequences, progress=False)


def test_killed_harvest_resumes_to_the_same_store(tmp_path):
    (tmp_path / "t.txt").write_text("\n\n".join(f"document number {i} with some words" for i in range(40)))
    texts = [str(tmp_path / "t.txt")]
    full = _harvest(tmp_path, "full", batch_sequences=4, texts=texts)
    with pytest.raises(KeyboardInterrupt):
        _harvest(tmp_path, "resumed", batch_sequences=4, crash_after=9, texts=texts)
    part = StoreWriter(str(tmp_path / "resumed"), d_model=4, shard_rows=50, shuffle_seed=None).rows_written
    assert 0 < part < full["rows"]
    again = _harvest(tmp_path, "resumed", batch_sequences=3, texts=texts)  # another batch size: still exact
    assert again["skipped_rows"] == part and again["rows"] == full["rows"]
    a, b = open_store(str(tmp_path / "full")), open_store(str(tmp_path / "resumed"))
    rows_a, rows_b = _all_rows(a), _all_rows(b)
    np.testing.assert_array_equal(rows_a, rows_b)
    assert not (rows_a[:, 0] == SPECIAL.bos).any()  # no BOS (or EOS/pad) rows reached the store
    assert not np.isin(rows_a[:, 0], [SPECIAL.eos, SPECIAL.pad]).any()


def test_a_ctrl_c_python_dropped_stops_the_harvest_at_the_next_batch(tmp_path, monkeypatch):
    """A Ctrl-C whose KeyboardInterrupt is raised inside one of jax's gc callbacks is dropped by
    Python; the command's handler remembers it and the harvest stops before its next batch (it
    harvested on to the end), leaving a store that resumes."""
    from jumprelu import errors

    monkeypatch.setattr(errors, "_ctrl_c_seen", False)
    (tmp_path / "t.txt").write_text("\n\n".join(f"document number {i} with some words" for i in range(40)))
    writer = StoreWriter(str(tmp_path / "s"), d_model=4, shard_rows=50, shuffle_seed=None)
    calls = []

    def site(tokens):
        calls.append(1)
        if len(calls) == 3:
            with contextlib.suppress(KeyboardInterrupt):  # what Python does to it in a gc callback
                errors.raise_on_ctrl_c(signal.SIGINT, None)
        return [_fake_site(tokens)]

    seqs = text_lib.sequences([str(tmp_path / "t.txt")], CharTokenizer(), seq_len=16)
    with pytest.raises(KeyboardInterrupt):
        collect_lib.collect(seqs, site, [writer], SPECIAL, 4, progress=False)
    assert len(calls) == 3 and not (tmp_path / "s" / "metadata.json").exists()


def test_a_store_past_max_rows_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "t.txt").write_text("\n\n".join(f"document number {i} with some words" for i in range(40)))
    texts = [str(tmp_path / "t.txt")]
    with pytest.raises(KeyboardInterrupt):
        _harvest(tmp_path, "part", batch_sequences=4, crash_after=9, texts=texts)
    writer = StoreWriter(str(tmp_path / "part"), d_model=4, shard_rows=50, shuffle_seed=None)
    part = writer.rows_written
    seqs = text_lib.sequences(texts, CharTokenizer(), seq_len=16)
    with pytest.raises(DataError, match=f"already holds {part} rows, more than max_tokens={part - 1}"):
        collect_lib.collect(seqs, lambda t: [_fake_site(t)], [writer], SPECIAL, 4, max_rows=part - 1, progress=False)
    assert not (tmp_path / "part" / "metadata.json").exists()  # still resumable


class PieceTokenizer(CharTokenizer):
    def pieces(self, ids):
        return [chr(i - 4) if i >= 4 else f"<{i}>" for i in ids]


def _token_and_position(tokens):
    """A stand-in site whose activation row is (token id, position in its sequence)."""
    pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    return [np.stack([tokens, pos], -1).astype(np.float32)]


def test_store_rows_replay_to_their_token_contexts(tmp_path):
    """Neuronpedia contexts: a harvested store's row (shard, row) maps back, through the writer's
    shuffle and the packing, to the token it was computed at (here the activation is the token id)."""
    from jumprelu.harvest.contexts import harvest_rows, store_contexts
    from jumprelu.store.reader import read_metadata

    sources = _sources(tmp_path)
    store = str(tmp_path / "store")
    extra = {"tokenizer": "unused", "seq_len": 8, "text_field": "text", "split_paragraphs": False}
    writer = StoreWriter(store, d_model=2, shard_rows=7, text_source=",".join(sources), extra=extra)
    seqs = text_lib.sequences(sources, PieceTokenizer(), 8)
    collect_lib.collect(seqs, _token_and_position, [writer], SPECIAL, 3, progress=False)
    meta = read_metadata(store)
    coords = np.array([(s, r) for s, shard in enumerate(meta["shards"]) for r in range(shard["rows"])])
    assert len(meta["shards"]) > 2
    # Every store row is one harvest row, once.
    assert sorted(harvest_rows(meta, coords)) == list(range(len(coords)))
    rows = _all_rows(open_store(store))
    contexts = store_contexts(store, before=3, after=2, tokenizer=PieceTokenizer())(coords)
    for row, ctx in zip(rows, contexts, strict=True):
        assert ctx["token_ids"][ctx["position"]] == row[0]
        assert ctx["position"] == min(int(row[1]), 3) and len(ctx["tokens"]) == len(ctx["token_ids"])
    assert store_contexts(store) is None  # the recorded tokenizer file does not exist


@pytest.mark.parametrize("max_rows", [None, 40])
def test_a_store_harvested_by_several_processes_replays_to_its_token_contexts(tmp_path, max_rows):
    """Three processes, as `jumprelu harvest` runs them on a pod slice: each takes every third
    sequence (cut at max_rows as one process would be) into its own shuffled part; every row of
    the committed store maps back to the token it was computed at. Without the recorded number of
    processes (stores committed before it was) there are no contexts rather than wrong ones."""
    from jumprelu.harvest.contexts import part_rows, store_contexts
    from jumprelu.store.commit import commit_parts
    from jumprelu.store.reader import read_metadata

    sources = _sources(tmp_path)
    store = str(tmp_path / "store")
    extra = {"tokenizer": "unused", "seq_len": 8, "text_field": "text", "split_paragraphs": False}
    for part in range(3):
        writer = StoreWriter(
            store, d_model=2, shard_rows=5, text_source=",".join(sources), extra=extra, part=part, parts=3
        )
        seqs = collect_lib.host_sequences(text_lib.sequences(sources, PieceTokenizer(), 8), part, 3, SPECIAL, max_rows)
        collect_lib.collect(seqs, _token_and_position, [writer], SPECIAL, 2, progress=False)
    commit_parts(store, 3)
    meta = read_metadata(store)
    assert meta["parts"] == 3 and len({s["file"][:10] for s in meta["shards"]}) == 3
    coords = np.array([(s, r) for s, shard in enumerate(meta["shards"]) for r in range(shard["rows"])])
    assert max_rows is None or len(coords) == max_rows
    parts, rows = part_rows(meta, coords)
    for k in range(3):  # every row of a part is one of its harvest rows, once
        assert sorted(rows[parts == k]) == list(range(int((parts == k).sum())))
    stored = _all_rows(open_store(store))
    contexts = store_contexts(store, before=3, after=2, tokenizer=PieceTokenizer())(coords)
    for row, ctx in zip(stored, contexts, strict=True):
        assert ctx["token_ids"][ctx["position"]] == row[0]
        assert ctx["position"] == min(int(row[1]), 3)
    meta_file = os.path.join(store, "metadata.json")
    with open(meta_file) as f:
        meta = json.load(f)
    del meta["parts"]
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    assert store_contexts(store, tokenizer=PieceTokenizer()) is None
