"""Multi-host harvest and LM evaluation: two real processes (4 CPU devices each) on the tiny Gemma 2.

Each process holds the whole LM on its own 4 devices and handles every other packed sequence;
the store they write together, and the evaluation report, must equal what one process
(8 devices) computes from the same texts. Rows are compared as a multiset: the processes'
shards hold the same rows in another order, and a 4-way vs an 8-way split of the LM's params
sums in another order (~1e-6).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("gemma")
pytest.importorskip("sentencepiece")
cKDTree = pytest.importorskip("scipy.spatial").cKDTree

import ml_collections  # noqa: E402

from jumprelu.errors import DataError  # noqa: E402
from jumprelu.store import StoreWriter, open_store  # noqa: E402
from jumprelu.store.commit import commit_parts  # noqa: E402
from tests.test_store import _all_rows  # noqa: E402
from tests.test_train import ROOT  # noqa: E402

# The first 3,000 of the tiny texts' ~10,000 rows: the processes cut where one process cuts
# (in the middle of a sequence, which only one of them holds).
MAX_TOKENS = 3000
TOL = 1e-4  # rows within this distance are the same row (distinct rows here are >1e-2 apart)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from jumprelu.harvest import tiny

    d = tmp_path_factory.mktemp("world")
    tiny.make(str(d))
    return d


def _cfg(world, **over):
    from jumprelu.experiments.harvest.gemma2 import get_config

    c = get_config(f"tiny={world},layer=1,site=resid")
    c.progress = False
    c.update(over)
    return ml_collections.ConfigDict(c.to_dict())


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    """The reference: resid and mlp of layer 1 from one process driving 8 devices."""
    from jumprelu.harvest.run import harvest

    template = str(tmp_path_factory.mktemp("one") / "{site}_l{layer}")
    harvest(_cfg(world, sites=("resid", "mlp"), store=template, max_tokens=MAX_TOKENS))
    return template


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv, extra_env=({}, {})):
    """Two processes of one distributed run (4 CPU devices each), started together."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=4",
            JUMPRELU_DISTRIBUTED="1",
            JUMPRELU_COORDINATOR=f"127.0.0.1:{port}",
            JUMPRELU_NUM_PROCESSES="2",
            JUMPRELU_PROCESS_ID=str(pid),
            **extra_env[pid],
        )
        procs.append(
            subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return procs


def _finish(procs):
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # The result is the first JSON line (gloo, the CPU collectives, prints to stdout too).
    return [json.loads(next(line for line in out.splitlines() if line.startswith("{"))) for out, _ in outs]


def _harvest_cmd(world, template, sites="resid+mlp"):
    cmd = [sys.executable, "-m", "jumprelu", "harvest", "--config", f"harvest/gemma2:tiny={world},sites={sites}"]
    return cmd + ["--config.progress=False", f"--config.store={template}", f"--config.max_tokens={MAX_TOKENS}"]


def _assert_same_multiset(a: np.ndarray, b: np.ndarray):
    """Every row occurs as often in `a` as in `b` (up to TOL): duplicates (the same token after
    the same prefix) count."""
    assert a.shape == b.shape
    ta, tb = cKDTree(a), cKDTree(b)
    for x in (a, b):
        np.testing.assert_array_equal(
            ta.query_ball_point(x, TOL, return_length=True), tb.query_ball_point(x, TOL, return_length=True)
        )


def _assert_same_store(path, reference):
    got, want = open_store(path), open_store(reference)  # open_store verifies every shard's checksums
    assert got.num_rows == want.num_rows
    assert got.scale == pytest.approx(want.scale, rel=1e-6)
    for field in ("model", "site", "layer", "d_model", "dtype", "extra"):
        assert got.metadata[field] == want.metadata[field], field
    _assert_same_multiset(_all_rows(got), _all_rows(want))


def test_two_processes_write_the_one_process_store_and_metadata_once(world, tmp_path, one_process):
    template = str(tmp_path / "{site}_l{layer}")
    results = _finish(_launch(_harvest_cmd(world, template)))
    # Each process handled its own sequences; process 0 alone wrote both metadata.json files.
    assert [r["process"] for r in results] == [0, 1]
    assert results[0]["committed"] == results[0]["stores"] and results[1]["committed"] == []
    assert 0 < results[1]["rows"] < results[0]["num_rows"][0] == results[0]["rows"] + results[1]["rows"] == MAX_TOKENS
    for site in ("resid", "mlp"):
        path = template.format(site=site, layer=1)
        files = sorted(os.listdir(path))
        assert [f for f in files if not f.startswith("shard-")] == ["metadata.json"]  # no progress files left
        assert {f[:10] for f in files if f.startswith("shard-")} == {"shard-p000", "shard-p001"}
        _assert_same_store(path, one_process.format(site=site, layer=1))
        with pytest.raises(DataError, match="already complete"):  # a second commit is refused
            commit_parts(path, 2)
    _assert_same_contexts(template.format(site="resid", layer=1), one_process.format(site="resid", layer=1))


def _assert_same_contexts(path, reference):
    """Each row's Neuronpedia token context is the one the same activation has in the one-process
    store (rows paired by nearest activation: the two harvests' float sums differ in the last bits)."""
    from jumprelu.harvest.contexts import store_contexts

    def rows_and_contexts(p):
        store = open_store(p)
        coords = np.concatenate([np.stack([np.full(r, s), np.arange(r)], 1) for s, r in enumerate(store.shard_rows)])
        return _all_rows(store), store_contexts(p, before=4, after=0)(coords)

    got_rows, got = rows_and_contexts(path)
    want_rows, want = rows_and_contexts(reference)
    assert all(c is not None for c in got)
    sq = (want_rows**2).sum(1)
    for start in range(0, len(got_rows), 500):
        block = got_rows[start : start + 500]
        nearest = np.argmin(sq[None, :] - 2 * block @ want_rows.T, axis=1)
        for i, j in enumerate(nearest):
            assert got[start + i]["token_ids"] == want[j]["token_ids"], (start + i, j)


def test_a_host_killed_mid_harvest_resumes_without_duplicate_or_missing_rows(world, tmp_path, one_process):
    template = str(tmp_path / "{site}_l{layer}")
    store = template.format(site="resid", layer=1)
    cmd = _harvest_cmd(world, template, sites="resid")
    procs = _launch(cmd, ({}, {"JUMPRELU_HARVEST_KILL_AFTER_BATCHES": "6"}))  # process 1 dies like a lost VM
    assert procs[1].wait(timeout=300) == -signal.SIGKILL
    # Process 0 finishes its own part (no host waits for another before the end), then waits for
    # process 1 at the barrier: kill it there too, as a slice restart would.
    part0 = os.path.join(store, "writing-p000.json")
    deadline = time.time() + 300  # generous: the suite runs two test workers on two cores
    while not (os.path.exists(part0) and json.load(open(part0)).get("complete")):
        assert time.time() < deadline and procs[0].poll() is None, "process 0 did not finish its part"
        time.sleep(0.5)
    procs[0].kill()
    procs[0].communicate()
    assert not os.path.exists(os.path.join(store, "metadata.json"))
    with open(os.path.join(store, "writing-p001.json")) as f:
        shards_before = len(json.load(f)["shards"])
    assert shards_before > 0  # process 1 had committed some shards: the rerun must skip exactly those

    results = _finish(_launch(cmd))
    assert results[0]["skipped_rows"] == results[0]["rows"] > 0  # its part was complete: nothing recomputed
    assert 0 < results[1]["skipped_rows"] < results[1]["rows"]
    _assert_same_store(store, one_process.format(site="resid", layer=1))


def test_a_commit_that_fails_on_process_0_stops_every_process(world, tmp_path):
    """A progress file left by an earlier attempt with 3 processes: process 0's commit refuses the
    store, and process 1, which used to wait at the barrier for a process that had exited, stops
    too, each with one line."""
    template = str(tmp_path / "{site}_l{layer}")
    store = template.format(site="resid", layer=1)
    os.makedirs(store)
    with open(os.path.join(store, "writing-p002.json"), "w") as f:
        json.dump({"complete": False, "shards": []}, f)
    procs = _launch(_harvest_cmd(world, template, sites="resid"))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], [err[-2000:] for _, err in outs]
    assert "expected the progress files of parts 0..1" in outs[0][1].strip().splitlines()[-1]
    assert "process 0 could not write metadata.json" in outs[1][1].strip().splitlines()[-1]
    assert not os.path.exists(os.path.join(store, "metadata.json"))


def random_sae(d: int = 64, width: int = 128):
    """A fixed SAE with latents that fire on the tiny model's layer-1 residual stream."""
    from jumprelu.core.folded import SAE

    rng = np.random.default_rng(0)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return SAE(
        W_enc=f32(rng.normal(size=(d, width)) / d**0.5),
        b_enc=f32(rng.normal(size=width) * 0.1),
        threshold=f32(np.full(width, 0.5)),
        W_dec=f32(rng.normal(size=(width, d)) / width**0.5),
        b_dec=f32(rng.normal(size=d) * 0.1),
    )


EVAL_SEQUENCES = 15  # odd: the processes score 8 and 7 sequences, in different batch counts

_EVAL_WORKER = f"""
import json, sys
from tests.test_harvest_multihost import _cfg, random_sae
from jumprelu.harvest import lm_eval
cfg = _cfg(sys.argv[1])
cfg.eval.sequences = {EVAL_SEQUENCES}
result = lm_eval.evaluate_lm(random_sae(), cfg)
result["firing_frequency"] = result["firing_frequency"].tolist()
print(json.dumps(result))
"""


def test_two_process_delta_lm_loss_equals_one_process(world):
    from jumprelu.harvest import lm_eval

    cfg = _cfg(world)
    cfg.eval.sequences = EVAL_SEQUENCES
    want = lm_eval.evaluate_lm(random_sae(), cfg)
    results = _finish(_launch([sys.executable, "-c", _EVAL_WORKER, str(world)]))
    assert results[0] == results[1]  # every process returns the whole report
    got = results[0]
    assert got["sequences"] == want["sequences"] == EVAL_SEQUENCES
    assert got["scored_tokens"] == want["scored_tokens"] and got["tokens"] == want["tokens"]
    assert 0 < want["l0"] < 128 and want["ce_zero_ablated"] != want["ce_clean"]
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablated", "delta_lm_loss", "loss_recovered", "l0", "mse", "fvu"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    np.testing.assert_allclose(got["firing_frequency"], want["firing_frequency"], atol=1.5 / want["tokens"])


def test_host_sequences_split_the_texts_and_cut_at_max_rows_as_one_process_does(world):
    from jumprelu.harvest import collect, text
    from jumprelu.harvest.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(str(world / "tok.model"))
    seqs = list(text.sequences([str(world / "train.txt")], tok, 32, split_paragraphs=True))

    def kept(ss):
        return np.concatenate([np.zeros(0, np.int32)] + [s[text.keep_mask(s, tok.special)] for s in ss])

    for processes in (1, 2, 3):
        shares = [list(collect.host_sequences(iter(seqs), k, processes, tok.special)) for k in range(processes)]
        assert sum(len(s) for s in shares) == len(seqs)
        assert [len(s) for s in shares] == [len(seqs[k::processes]) for k in range(processes)]
        for max_rows in (1, 100, 1000):  # the first max_rows kept tokens of the texts, in some share
            cut = [
                kept(collect.host_sequences(iter(seqs), k, processes, tok.special, max_rows)) for k in range(processes)
            ]
            got = np.sort(np.concatenate(cut))
            np.testing.assert_array_equal(got, np.sort(kept(seqs)[:max_rows]))


def _writer(path, **kw):
    return StoreWriter(str(path), d_model=4, shard_rows=3, **kw)


def test_parts_resume_their_own_files_and_commit_checks_every_part(tmp_path):
    rows = np.arange(40, dtype=np.float32).reshape(10, 4)
    a = _writer(tmp_path, part=0, parts=2)
    a.append(rows[:7])  # two shards written, one row buffered (lost in a crash)
    b = _writer(tmp_path, part=1, parts=2)  # opening part 1 must not touch part 0's files
    assert b.rows_written == 0 and _writer(tmp_path, part=0, parts=2).rows_written == 6
    with pytest.raises(DataError, match="interrupted write by 2 processes is in progress, this run has 3"):
        _writer(tmp_path, part=0, parts=3)
    with pytest.raises(DataError, match="a multi-process write is in progress"):
        _writer(tmp_path)
    b.append(rows[7:])
    b.close()
    with pytest.raises(DataError, match="incomplete: a write by several processes is in progress"):
        open_store(str(tmp_path))
    with pytest.raises(DataError, match="part 0 is not complete"):
        commit_parts(str(tmp_path), 2)
    with pytest.raises(DataError, match="expected the progress files of parts 0..2"):
        commit_parts(str(tmp_path), 3)
    a = _writer(tmp_path, part=0, parts=2)
    a.append(rows[6:7])
    a.close()
    meta = commit_parts(str(tmp_path), 2)
    assert meta["num_rows"] == 10
    assert meta["scale"] == pytest.approx(float(np.sqrt(np.mean(np.sum(rows.astype(np.float64) ** 2, axis=1)))))
    got = _all_rows(open_store(str(tmp_path)))
    np.testing.assert_array_equal(got[np.argsort(got[:, 0])], rows)


def test_tpu_run_starts_the_harvest_on_every_worker(capsys):
    from jumprelu.launch import tpu

    common = ["--zone", "us-east5-a", "--project", "proj", "--dry_run"]
    tpu.main(["setup", "sae-pod", "--mount_bucket", "bkt", "--extras", "tpu,gemma", *common])
    harvest = "harvest/gemma2:model=gemma2_9b,sites=resid+mlp+attn,layers=9+20+31"
    tpu.main(["run", "sae-pod", "--harvest", harvest, "--config.store=/gcs/bkt/s/{site}_l{layer}", *common])
    ssh = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ gcloud compute tpus tpu-vm ssh")]
    assert "pip install -q -c constraints.txt -e '\"'\"'.[tpu,gemma]'\"'\"'" in ssh[0]
    assert all("--worker=all" in c for c in ssh)
    launch = "JUMPRELU_DISTRIBUTED=1 nohup flock -n ~/jumprelu.lock .venv/bin/python -m jumprelu harvest"
    assert f"{launch} --config={harvest} " in ssh[-1]
    assert "--config.store=/gcs/bkt/s/{site}_l{layer}" in ssh[-1]
