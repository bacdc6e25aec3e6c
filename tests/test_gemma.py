"""Gemma 2 harvest and delta-LM-loss evaluation on a tiny Gemma 2 with random weights.

The test trains its own sentencepiece tokenizer on a small text and saves the model's params
in the official (flat) checkpoint layout, so the real loading, tokenising, capturing and
splicing code runs. Skipped when the gemma extra is not installed (see README).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gemma")
pytest.importorskip("sentencepiece")

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from jumprelu.errors import DataError  # noqa: E402
from jumprelu.harvest import (
    gemma_model,  # noqa: E402
    lm_eval,  # noqa: E402
)
from jumprelu.harvest import text as text_lib  # noqa: E402
from jumprelu.store import open_store  # noqa: E402
from tests.test_store import _all_rows  # noqa: E402
from tests.test_train import ROOT  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny world (tokenizer, flat-layout checkpoint, texts), made once through the real code."""
    from jumprelu.harvest import tiny

    d = tmp_path_factory.mktemp("gemma")
    made = tiny.make(str(d))
    return {"dir": d, "tok": made["tokenizer"], "model": made["model"], "params": made["params"]}


def _cfg(world, **over):
    from jumprelu.experiments.harvest.gemma2 import get_config

    c = get_config(f"tiny={world['dir']},layer=1,site=resid")
    c.progress = False
    c.update(over)
    return ml_collections.ConfigDict(c.to_dict())


@pytest.mark.parametrize("site", gemma_model.SITES)
def test_captured_sites_equal_an_independent_computation(world, site):
    model, params = world["model"], world["params"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, world["tok"].vocab_size, (2, 12)), jnp.int32)
    layer = 1
    got = gemma_model.site_fn(model, gemma_model.check_site(model.config, site, layer))(params, tokens)
    # Independently: flax's own capture of the full forward (outputs), and for attn the
    # definition pre_wo @ W_O = attn_vec_einsum's output, which capture does record.
    _, inter = model.apply({"params": params}, tokens, method=gemma_model.Gemma2.logits, capture_intermediates=True)
    block = inter["intermediates"][f"layer_{layer}"]
    if site == "resid":
        want = block["__call__"][0][1]
    elif site == "mlp":
        want = block["post_ffw_norm"]["__call__"][0]
    else:
        w_o = params[f"layer_{layer}"]["attn"]["attn_vec_einsum"]["w"]
        want = block["attn"]["attn_vec_einsum"]["__call__"][0]
        got = got @ w_o.reshape(-1, w_o.shape[-1])
    assert got.shape[-1] == want.shape[-1]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name, layers, d_model, attn_width",
    [("gemma2_2b", 26, 2304, 8 * 256), ("gemma2_9b", 42, 3584, 16 * 256), ("gemma2_27b", 46, 4608, 32 * 128)],
)
def test_released_sizes_have_the_papers_site_widths_and_split_params(name, layers, d_model, attn_width):
    import jax

    model = gemma_model.make_model(name)
    assert model.config.num_layers == layers
    params = gemma_model.abstract_params(model, gemma_model.device_mesh())
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    widths = [d_model, d_model, attn_width]  # resid, mlp, attn
    assert [gemma_model.site_width(model.config, s) for s in gemma_model.SITES] == widths
    # One trace of the whole depth for the three sites (each trace of a 42-layer model is ~5 s).
    sites = tuple(gemma_model.check_site(model.config, s, layers - 1) for s in gemma_model.SITES)
    shapes = [a.shape for a in jax.eval_shape(gemma_model.sites_fn(model, sites), params, tokens)]
    assert shapes == [(1, 4, w) for w in widths]
    with pytest.raises(DataError, match=f"layer {layers} is out of range"):
        gemma_model.check_site(model.config, "resid", layers)
    # Every large weight is split over the devices: each holds ~1/n of the bf16 params.
    total = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
    per_device = sum(_shard_bytes(p) for p in jax.tree.leaves(params))
    assert per_device < 1.01 * total / jax.device_count()


def _shard_bytes(p):
    return int(np.prod(p.sharding.shard_shape(p.shape))) * p.dtype.itemsize


def test_identity_splice_gives_zero_delta_and_zeros_give_the_ablation(world):
    model, params = world["model"], world["params"]
    tokens = jnp.asarray(np.random.default_rng(1).integers(4, world["tok"].vocab_size, (2, 12)), jnp.int32)
    site = gemma_model.check_site(model.config, "mlp", 0)
    keep = jnp.ones(tokens.shape, bool)
    clean = gemma_model.token_losses(model)(params, tokens)
    ident = gemma_model.token_losses(model, site, lambda keep, x: jnp.where(keep[..., None], x, 0.0))
    np.testing.assert_allclose(ident(params, tokens, keep), clean, atol=1e-6)
    zero = gemma_model.token_losses(model, site, lm_eval.zero_replace)(params, tokens, keep)
    zero_again = gemma_model.token_losses(model, site, lambda keep, x: jnp.zeros_like(x))(params, tokens, keep)
    np.testing.assert_allclose(zero, zero_again, atol=1e-6)
    assert float(jnp.abs(zero - clean).max()) > 1e-3  # the splice really happens


@pytest.mark.parametrize("width", [64, 60])  # 64: split over the 8 devices; 60: replicated
def test_spliced_loss_is_the_same_with_the_sae_split_over_the_devices(world, width):
    import jax

    model = world["model"]
    mesh = gemma_model.device_mesh()
    shardings = jax.tree.map(lambda a: a.sharding, gemma_model.abstract_params(model, mesh))
    params = jax.device_put(world["params"], shardings)
    rng = np.random.default_rng(2)
    d = model.config.embed_dim
    sae = (rng.normal(size=(d, width)) / d**0.5, rng.normal(size=width) * 0.1, np.full(width, 0.05),
           rng.normal(size=(width, d)) / width**0.5, rng.normal(size=d) * 0.1)  # fmt: skip
    sae = [np.asarray(a, np.float32) for a in sae]
    split = lm_eval.sae_shardings(mesh, width)
    assert (split[0].spec == jax.sharding.PartitionSpec(None, "model")) == (width % jax.device_count() == 0)
    tokens = jnp.asarray(rng.integers(4, world["tok"].vocab_size, (2, 12)), jnp.int32)
    keep = jnp.ones(tokens.shape, bool)
    run = gemma_model.token_losses(model, gemma_model.check_site(model.config, "resid", 1), lm_eval.sae_replace(None))
    placed = [jax.device_put(a, s) for a, s in zip(sae, split, strict=True)]
    replicated = [jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())) for a in sae]
    np.testing.assert_allclose(run(params, tokens, keep, *placed), run(params, tokens, keep, *replicated), atol=1e-5)


def test_harvest_stores_only_real_tokens_and_resumes_exactly(world, tmp_path):
    from jumprelu.harvest.run import harvest

    full = harvest(_cfg(world, store=str(tmp_path / "full")))
    seqs = list(text_lib.sequences([str(world["dir"] / "train.txt")], world["tok"], 32, split_paragraphs=True))
    real = sum(int(text_lib.keep_mask(s, world["tok"].special).sum()) for s in seqs)
    assert full["rows"] == real  # one row per token that is not BOS/EOS/pad
    meta = open_store(str(tmp_path / "full")).metadata
    assert (meta["model"], meta["site"], meta["layer"], meta["d_model"]) == ("tiny", "resid", 1, 64)
    assert meta["extra"]["seq_len"] == 32
    # Killed after 3 batches: complete shards survive; the rerun continues and matches.
    env = dict(os.environ, JUMPRELU_HARVEST_KILL_AFTER_BATCHES="3")
    cmd = [sys.executable, "-m", "jumprelu", "harvest", "--config", f"harvest/gemma2:tiny={world['dir']}"]
    cmd += ["--config.progress=False", f"--config.store={tmp_path / 'resumed'}"]
    killed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert killed.returncode != 0
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[0])["skipped_rows"] > 0
    a, b = open_store(str(tmp_path / "full")), open_store(str(tmp_path / "resumed"))
    assert a.shard_rows == b.shard_rows
    for i in range(len(a.shard_rows)):
        np.testing.assert_allclose(a.shard(i), b.shard(i), rtol=1e-5, atol=1e-5)


def _store_rows(path):
    return _all_rows(open_store(str(path)))


def test_several_sites_from_one_pass_equal_separate_harvests_and_resume_per_store(world, tmp_path):
    from jumprelu.harvest.run import harvest

    pairs = [(site, layer) for layer in (0, 1) for site in ("resid", "mlp", "attn")]
    template = str(tmp_path / "one_pass" / "{site}_l{layer}")
    one_pass = harvest(_cfg(world, sites=("resid", "mlp", "attn"), layers=(0, 1), store=template))
    assert one_pass["stores"] == [template.format(site=s, layer=l) for s, l in pairs]
    # each site and each layer against a harvest of its own (all six would double the test's time)
    alone_pairs = {("resid", 0), ("mlp", 1), ("attn", 0)}
    for (site, layer), path in zip(pairs, one_pass["stores"], strict=True):
        meta = open_store(path).metadata
        assert (meta["site"], meta["layer"]) == (site, layer)
        if (site, layer) not in alone_pairs:
            continue
        alone = harvest(_cfg(world, site=site, layer=layer, store=str(tmp_path / f"alone_{site}_{layer}")))
        assert alone["rows"] == one_pass["rows"]
        want = _store_rows(tmp_path / f"alone_{site}_{layer}")
        np.testing.assert_allclose(_store_rows(path), want, rtol=1e-5, atol=1e-5)

    # A crash can leave the stores at different points: attn complete, mlp killed midway, resid
    # not started. The rerun leaves attn alone, continues mlp from its own count and fills resid.
    resumed = str(tmp_path / "resumed" / "{site}_l{layer}")
    harvest(_cfg(world, site="attn", layer=1, store=resumed))
    cmd = [sys.executable, "-m", "jumprelu", "harvest", "--config", f"harvest/gemma2:tiny={world['dir']}"]
    cmd += ["--config.progress=False", f"--config.store={resumed}", "--config.site=mlp", "--config.layer=1"]
    env = dict(os.environ, JUMPRELU_HARVEST_KILL_AFTER_BATCHES="3")
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True).returncode != 0
    # a complete store of another harvest is not taken as this one's (was: left as "already complete")
    with pytest.raises(
        DataError, match=r"attn_l1: already complete, from another harvest \(extra.seq_len 32, this run's 16\)"
    ):
        harvest(_cfg(world, sites=("resid", "mlp", "attn"), layers=(1,), store=resumed, seq_len=16))
    # found by an audit: another checkpoint (Gemma 2 9B and 9B-it share a model name) or another LM
    # precision was not compared, so a complete store of it was kept beside this harvest's
    other = tmp_path / "same_weights_other_path"
    other.symlink_to(world["dir"] / "ckpt")
    for over, field in (({"checkpoint": str(other)}, "extra.checkpoint"), ({"dtype": "bfloat16"}, "extra.lm_dtype")):
        with pytest.raises(DataError, match=rf"attn_l1: already complete, from another harvest \({field} "):
            harvest(_cfg(world, sites=("resid", "mlp", "attn"), layers=(1,), store=resumed, **over))
    again = harvest(_cfg(world, sites=("resid", "mlp", "attn"), layers=(1,), store=resumed))
    assert again["already_complete"] == [resumed.format(site="attn", layer=1)]
    assert again["resumed_from"][0] == 0 and again["resumed_from"][1] > 0  # resid, mlp
    for site in ("resid", "mlp", "attn"):
        got, want = (_store_rows(t.format(site=site, layer=1)) for t in (resumed, template))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # (other compiled programs: not bitwise)
    # an audit: rerunning the finished harvest (a `harvest && train` script run again) was exit 2,
    # "already complete ... write to a new directory"; as `store convert`, it now does nothing
    cmd = [sys.executable, "-m", "jumprelu", "harvest", "--config"]
    cmd += [f"harvest/gemma2:tiny={world['dir']},sites=resid+mlp+attn,layers=1", f"--config.store={resumed}"]
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.count("rows; nothing to do") == 3 and "already holds this harvest's" in rerun.stdout


@pytest.mark.parametrize(
    "over, message",
    [
        ({"sites": ("resid", "mlp"), "store": "/tmp/one"}, "it must contain {site} and {layer}"),
        ({"sites": ("resid",), "layers": (0, 1), "store": "/tmp/{{site}}_{{layer}}"}, "it must contain {site}"),
        ({"store": "/tmp/{model}"}, "config field store '/tmp/{model}': not a path template (KeyError"),
        ({"sites": ("resid", "resid"), "store": "/tmp/{site}{layer}"}, "list a site twice"),
        ({"layers": (1, 5), "store": "/tmp/{site}{layer}"}, "config fields sites/layers: layer 5 is out of range"),
        ({"sites": ("resid", "mlpp"), "store": "/tmp/{site}{layer}"}, "config fields sites/layers: unknown site"),
    ],
)
def test_bad_site_lists_give_one_line_errors(world, over, message):
    import re

    from jumprelu.harvest.run import harvest

    with pytest.raises(DataError, match=re.escape(message)) as e:
        harvest(_cfg(world, **over))
    assert "\n" not in str(e.value)


def test_config_argument_expands_sites_and_layers():
    from jumprelu.experiments.harvest.gemma2 import get_config
    from jumprelu.harvest.run import harvest_sites

    cfg = get_config("sites=resid+mlp+attn,layers=9+20")
    assert harvest_sites(cfg) == [("resid", 9), ("mlp", 9), ("attn", 9), ("resid", 20), ("mlp", 20), ("attn", 20)]
    cfg = get_config("sites=mlp+attn")
    cfg.layer = 31  # as --config.layer=31: the sites follow it
    assert harvest_sites(cfg) == [("mlp", 31), ("attn", 31)]
    assert harvest_sites(get_config("tiny=/x,sites=resid+mlp")) == [("resid", 1), ("mlp", 1)]
    assert harvest_sites(get_config("model=gemma2_9b,site=attn,layer=9")) == [("attn", 9)]


@pytest.mark.parametrize(
    "over, message",
    [
        ({"texts": ("/nope/train.txt",)}, "text source /nope/train.txt: no such file"),
        ({"texts": ("EVAL",), "text_field": "content"}, "eval.jsonl, line 1: no string field 'content'"),
        ({"seq_len": 1}, "config field seq_len must be an integer >= 2"),
        ({"shard_rows": -5}, "config field shard_rows must be a positive integer or unset, found -5"),
        ({"batch_sequences": 0}, "config field batch_sequences must be a positive integer, found 0"),
        ({"max_tokens": -1}, "config field max_tokens must be a positive integer or unset, found -1"),
        # found by an audit: tracebacks or "no rows were written" after the model loaded, each leaving a
        # store in progress that refused the corrected rerun
        ({"texts": ("latin1.txt",)}, r"latin1.txt: not UTF-8 text \(byte 6: invalid continuation byte\)"),
        ({"texts": ("latin1.jsonl",)}, r"latin1.jsonl, line 1: not UTF-8 text"),
        ({"texts": ("empty.txt",)}, r"empty.txt: holds no document \(an empty file\?\)"),
    ],
)
def test_texts_and_store_fields_are_checked_before_the_model_loads(world, tmp_path, over, message):
    """Found after the model loaded, these left in-progress stores naming the bad value, which then
    refused the corrected rerun; now they fail first (the checkpoint here does not even exist)."""
    from jumprelu.harvest.run import harvest

    if over.get("texts") == ("EVAL",):
        over["texts"] = (f"{world['dir']}/eval.jsonl",)
    (tmp_path / "latin1.txt").write_bytes("Le café est chaud.".encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n\n")
    if over.get("texts", ("/",))[0] in ("latin1.txt", "latin1.jsonl", "empty.txt"):
        over["texts"] = (str(tmp_path / over["texts"][0]),)
    with pytest.raises(DataError, match=message) as e:
        harvest(_cfg(world, store=str(tmp_path / "s"), checkpoint="/nope/ckpt", **over))
    assert "\n" not in str(e.value) and not (tmp_path / "s").exists()


def test_a_missing_checkpoint_or_tokenizer_is_the_only_line_harvest_prints(tmp_path):
    """Found by an audit: these errors came after 3-4 lines of TensorFlow and XLA start-up, which
    importing gemma printed before the model's files were looked at."""
    (tmp_path / "t.txt").write_text("Some text to harvest.\n")
    (tmp_path / "ckpt").mkdir()
    base = ["harvest", "--config", "harvest/gemma2:layer=1", f"--config.store={tmp_path / 's'}"]
    base.append(f"--config.texts=('{tmp_path / 't.txt'}',)")
    for fields, want in (
        ([f"--config.checkpoint={tmp_path / 'nope'}", f"--config.tokenizer={tmp_path / 'tok.model'}"],
         f"checkpoint {tmp_path / 'nope'}: no such directory"),
        ([f"--config.checkpoint={tmp_path / 'ckpt'}", f"--config.tokenizer={tmp_path / 'tok.model'}"],
         f"tokenizer {tmp_path / 'tok.model'}: no such file"),
    ):  # fmt: skip
        cli = subprocess.run(
            [sys.executable, "-m", "jumprelu", *base, *fields], cwd=ROOT, capture_output=True, text=True
        )
        assert cli.returncode == 2 and cli.stderr.startswith(f"jumprelu: error: {want}"), cli.stderr
        assert cli.stderr.count("\n") == 1, cli.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("field, value", [("sequences", 0), ("sequences", -1), ("batch_sequences", -2)])
def test_lm_evaluation_sizes_are_checked_before_the_model_loads(world, field, value):
    from jumprelu.cli.evaluate import check_lm_site

    lm = _cfg(world)
    lm.eval[field] = value
    with pytest.raises(DataError, match=f"config field eval.{field} must be a positive integer, found {value}$"):
        check_lm_site({"data": {"source": "synthetic"}}, lm)  # the first check `evaluate --lm` makes


@pytest.mark.parametrize(
    "over, message",
    [
        ({"tokenizer": "/nope/tok.model"}, "tokenizer /nope/tok.model: no such file"),
        ({"checkpoint": "/nope/ckpt"}, "checkpoint /nope/ckpt: no such directory"),
        # a directory that holds no Gemma checkpoint (another model's is the same error): was a traceback
        ({"checkpoint": "WORLD"}, "does not hold this model's parameters .another size or family, or not a Gemma"),
        ({"layer": 7}, "layer 7 is out of range: this model has layers 0..1"),
        ({"site": "attn_out"}, "unknown site 'attn_out'"),
    ],
)
def test_bad_paths_and_sites_give_one_line_errors(world, tmp_path, over, message):
    from jumprelu.harvest.run import harvest

    if over.get("checkpoint") == "WORLD":
        over["checkpoint"] = str(world["dir"])

    with pytest.raises(DataError, match=message) as e:
        harvest(_cfg(world, store=str(tmp_path / "s"), **over))
    assert "\n" not in str(e.value)


def test_end_to_end_harvest_train_evaluate_with_delta_lm_loss(world, tmp_path):
    from jumprelu.harvest.run import harvest

    harvest(_cfg(world, store=str(tmp_path / "store")))
    run = tmp_path / "run"
    train = [sys.executable, "-m", "jumprelu", "train", "--config", "quickstart", "--workdir", str(run)]
    train += [
        f"--config.data.source={tmp_path / 'store'}",
        "--config.data.eval_rows=256",
        "--config.sae.width=128",
        "--config.train.steps=60",
        "--config.train.batch_size=128",
        "--config.train.lr_warmup_steps=10",
        "--config.train.sparsity_warmup_steps=20",
        "--config.ckpt.every_steps=60",
        "--config.log.progress=False",
    ]
    out = subprocess.run(train, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    ev = [sys.executable, "-m", "jumprelu", "evaluate", "--workdir", str(run)]
    ev += ["--lm", f"harvest/gemma2:tiny={world['dir']},layer=1,site=resid"]
    out = subprocess.run(ev, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(run / "eval.json") as f:
        result = json.load(f)
    lm = result["lm"]
    assert lm["scored_tokens"] > 100 and lm["ce_zero_ablated"] != lm["ce_clean"]
    assert lm["delta_lm_loss"] == pytest.approx(lm["ce_spliced"] - lm["ce_clean"])
    assert 0 < lm["l0"] < 128 and lm["fvu"] < 1.5
    assert os.path.exists(run / "firing_frequency.png")
    # an evaluation without --lm keeps the delta LM loss of the same step (it was overwritten)...
    out = subprocess.run(ev[:-2], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "kept the delta LM loss of step 60" in out.stdout, out.stderr[-2000:]
    with open(run / "eval.json") as f:
        plain = json.load(f)
    assert plain["lm"] == lm and plain["frequencies_from"] == "stored"
    # ...and one of another step is set aside with it first
    (run / "eval.json").write_text(json.dumps(dict(result, step=30)))
    out = subprocess.run(ev[:-2], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "lm" not in json.loads((run / "eval.json").read_text()), out.stderr[-2000:]
    assert json.loads((run / "eval_step30.json").read_text())["lm"] == lm
    (run / "eval_step30.json").unlink()  # ...on the --lm path too (it replaced it)
    (run / "eval.json").write_text(json.dumps(dict(result, step=30)))
    out = subprocess.run(ev, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and json.loads((run / "eval_step30.json").read_text())["lm"] == lm, out.stderr[-2000:]
    # every residual layer has the same width: another layer would give a wrong delta LM loss, no error
    ev[-1] = f"harvest/gemma2:tiny={world['dir']},layer=0,site=resid"
    out = subprocess.run(ev, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("jumprelu: error: --lm site, layer are resid 0 but the SAE was trained on rows of model")
