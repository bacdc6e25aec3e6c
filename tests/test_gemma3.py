"""Gemma 3 harvest, chat template and delta LM loss on a tiny Gemma 3 with random weights.

Like tests/test_gemma.py for Gemma 2: the tiny world (`jumprelu.harvest.tiny`, family gemma3)
has its own sentencepiece tokenizer with Gemma's chat pieces and a checkpoint in the official
flat layout, so the real loading, templating, masking, capturing and splicing code runs.
"""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gemma")
pytest.importorskip("sentencepiece")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from jumprelu.errors import ConfigError, DataError  # noqa: E402
from jumprelu.harvest import gemma_model  # noqa: E402
from jumprelu.harvest import text as text_lib  # noqa: E402
from jumprelu.harvest import tokenizer as tokenizer_lib  # noqa: E402
from jumprelu.store import open_store  # noqa: E402
from tests.test_train import ROOT  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from jumprelu.harvest import tiny

    d = tmp_path_factory.mktemp("gemma3")
    made = tiny.make(str(d), family="gemma3")
    return {"dir": d, "tok": made["tokenizer"], "model": made["model"], "params": made["params"]}


def _cfg(world, arg="", **over):
    from jumprelu.experiments.harvest.gemma3 import get_config

    c = get_config(f"tiny={world['dir']},layer=1,site=resid" + (f",{arg}" if arg else ""))
    c.progress = False
    c.update(over)
    return ml_collections.ConfigDict(c.to_dict())


def _rms(x, scale):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * (1 + np.asarray(scale, np.float64))


def _attention_by_hand(params, cfg, layer, x, positions):
    """Block `layer`'s per-head attention outputs (before W_O) recomputed from its weights:
    pre-attention norm, q/kv projections, Gemma 3's QK RMSNorms, RoPE (gemma's function, with the
    layer's base and scale), 1/sqrt(head_dim) scaling, GQA, causal (+ sliding window) softmax."""
    from gemma.gm.math import _positional_embeddings

    p = params[f"layer_{layer}"]
    local = cfg.attention_types[layer] == gemma_model.gm.nn.AttentionType.LOCAL_SLIDING
    base = cfg.local_base_frequency if local else cfg.global_base_frequency
    scale = cfg.local_scale_factor if local else cfg.global_scale_factor
    h = _rms(x, p["pre_attention_norm"]["scale"])
    q = np.einsum("btd,ndh->btnh", h, p["attn"]["q_einsum"]["w"])
    k, v = np.einsum("bsd,ckdh->cbskh", h, p["attn"]["kv_einsum"]["w"])
    q, k = _rms(q, p["attn"]["_query_norm"]["scale"]), _rms(k, p["attn"]["_key_norm"]["scale"])

    def rope(a):
        a = jnp.asarray(a, jnp.float32)
        return np.asarray(_positional_embeddings.apply_rope(a, positions, base_frequency=base, scale_factor=scale))

    q, k = rope(q) * cfg.head_dim**-0.5, rope(k)
    group = cfg.num_heads // cfg.num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # query head i reads kv head i // group
    logits = np.einsum("btnh,bsnh->bnts", q, k)
    t = np.arange(x.shape[1])
    allowed = t[None, :] <= t[:, None]
    if local:
        allowed &= t[:, None] - t[None, :] < cfg.sliding_window_size
    logits = np.where(allowed, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    enc = np.einsum("bnts,bsnh->btnh", probs, v)
    return enc.reshape(*enc.shape[:2], -1)


@pytest.mark.parametrize("layer", [0, 1])  # 0: local sliding window (8 < 20 tokens); 1: global
def test_tiny_gemma3_sites_equal_an_independent_computation(world, layer):
    model, params, cfg = world["model"], world["params"], world["model"].config
    assert cfg.use_qk_norm and cfg.attn_logits_soft_cap is None and cfg.final_logit_softcap is None
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, world["tok"].vocab_size, (2, 20)), jnp.int32)
    sites = tuple(gemma_model.check_site(cfg, s, layer) for s in gemma_model.SITES)
    resid, mlp, attn = (np.asarray(a, np.float64) for a in gemma_model.sites_fn(model, sites)(params, tokens))
    # gemma's own jitted forward (its __call__, not our methods), with flax recording each
    # module's output; and its logits equal ours (the full forward the LM evaluation splices).
    out, inter = model.apply({"params": params}, tokens, capture_intermediates=True)
    block = inter["intermediates"][f"layer_{layer}"]
    np.testing.assert_allclose(resid, block["__call__"][0][1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mlp, block["post_ffw_norm"]["__call__"][0], rtol=1e-4, atol=1e-5)
    ours = model.apply({"params": params}, tokens, method=gemma_model.Gemma.logits)
    np.testing.assert_allclose(ours, out.logits, rtol=1e-4, atol=1e-4)
    # The attention site by hand from the block's input, and the block's algebra: the residual
    # after the layer is its input + post-attention-norm(attn @ W_O) + mlp.
    if layer == 0:
        x_in = np.asarray(params["embedder"]["input_embedding"])[np.asarray(tokens)] * np.sqrt(cfg.embed_dim)
    else:
        x_in = np.asarray(inter["intermediates"][f"layer_{layer - 1}"]["__call__"][0][1], np.float64)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    np.testing.assert_allclose(attn, _attention_by_hand(params, cfg, layer, x_in, positions), rtol=1e-3, atol=1e-4)
    p = params[f"layer_{layer}"]
    w_o = np.asarray(p["attn"]["attn_vec_einsum"]["w"], np.float64)
    by_algebra = x_in + _rms(attn @ w_o.reshape(-1, w_o.shape[-1]), p["post_attention_norm"]["scale"]) + mlp
    np.testing.assert_allclose(resid, by_algebra, rtol=1e-4, atol=1e-4)


GEMMA3_SIZES = [  # size, layers, d_model, attn width (heads × head_dim)
    ("270m", 18, 640, 4 * 256),
    ("1b", 26, 1152, 4 * 256),
    ("4b", 34, 2560, 8 * 256),
    ("12b", 48, 3840, 16 * 256),
    ("27b", 62, 5376, 32 * 128),
]


@pytest.mark.parametrize("size, layers, d_model, attn_width", GEMMA3_SIZES)
def test_released_gemma3_sizes_have_their_layers_and_site_widths(size, layers, d_model, attn_width):
    from jumprelu.experiments.harvest import gemma3 as experiment

    assert experiment.LAYERS[size] == layers
    for kind in ("pt", "it"):
        assert gemma_model.family(f"gemma3_{size}_{kind}") == "gemma3"
    model = gemma_model.make_model(f"gemma3_{size}_pt")
    assert model.config.num_layers == layers and model.config.vision_encoder is None  # text only
    params = gemma_model.abstract_params(model, gemma_model.device_mesh())
    assert set(params["embedder"]) == {"input_embedding"}  # no multimodal projection to restore
    assert params["embedder"]["input_embedding"].shape == (262_144, d_model)
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    sites = tuple(gemma_model.check_site(model.config, s, layers - 1) for s in gemma_model.SITES)
    fn = gemma_model.sites_fn(model, sites)
    shapes = [a.shape for a in jax.eval_shape(fn, params, tokens)]
    assert shapes == [(1, 4, d_model), (1, 4, d_model), (1, 4, attn_width)]
    assert [gemma_model.site_width(model.config, s) for s in gemma_model.SITES] == [d_model, d_model, attn_width]
    with pytest.raises(DataError, match=f"layer {layers} is out of range"):
        gemma_model.check_site(model.config, "resid", layers)


def test_unknown_model_names_give_one_line_errors():
    for name in ("gemma3_2b_pt", "gemma3_1b", "gemma4_1b_pt"):
        with pytest.raises(DataError, match=f"unknown model '{name}'"):
            gemma_model.make_model(name)


def _by_hand(tok, turns):
    """(ids, is_template) of Gemma's chat turns, built directly from the tokenizer."""
    ids, template = [], []
    start, end = tok.piece_id("<start_of_turn>"), tok.piece_id("<end_of_turn>")
    for role, content in turns:
        for part, is_t in (([start, *tok.encode(f"{role}\n")], True), (tok.encode(content), False)):
            ids += part
            template += [is_t] * len(part)
        part = [end, *tok.encode("\n")]
        ids += part
        template += [True] * len(part)
    return ids, template


def test_chat_template_masks_exactly_the_template_tokens(world, tmp_path):
    plain = tokenizer_lib.SentencePieceTokenizer(str(world["dir"] / "tok.model"))
    tok = tokenizer_lib.SentencePieceTokenizer(str(world["dir"] / "tok.model"), chat_template=True)
    convs = [
        [{"role": "system", "content": "be brief."}, {"role": "user", "content": "the cat sat."},
         {"role": "assistant", "content": "on the mat."}, {"role": "user", "content": "then?"}],
        [{"role": "user", "content": "a dog ran quickly under the big red tree and then it sat."}],
    ]  # fmt: skip
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    txt = tmp_path / "doc.txt"
    txt.write_text("it was small <start_of_turn> and blue.")
    turns = [
        [("user", "be brief.\n\nthe cat sat."), ("model", "on the mat."), ("user", "then?")],
        [("user", convs[1][0]["content"])],
    ]
    stream, template = [], []
    for t in turns:
        ids, is_t = _by_hand(plain, t)
        stream += [*ids, tok.special.eos]
        template += [*is_t, True]
    # seq_len 11: 10 stream tokens per sequence, so several cuts would split a 6-token header.
    seqs = list(text_lib.sequences([str(src)], tok, 11, "messages"))
    got_ids, got_keep = [], []
    for seq in seqs:
        keep = text_lib.keep_mask(seq, tok.special)
        real = (seq != tok.special.pad) & (np.arange(len(seq)) > 0)
        assert seq[0] == tok.special.bos and not keep[0]
        got_ids += list(seq[real])
        got_keep += list(keep[real])
    assert any((s == tok.special.pad).any() for s in seqs[:-1])  # a piece moved to the next sequence
    # The sequences hold the stream in order, and are kept exactly where the content is (a
    # piece cut in two would leave its second part unmatched, hence kept).
    assert got_ids == stream
    assert got_keep == [not t for t in template]
    # A literal <start_of_turn> inside a text is masked too; the rest of the text is kept.
    (seq,) = text_lib.sequences([str(txt)], tok, 64)
    pieces = tok.pieces(seq[text_lib.keep_mask(seq, tok.special)])
    assert "<start_of_turn>" not in pieces and len(pieces) == len(plain.encode(txt.read_text())) - 1
    # Without the template, conversations are refused with the fix; bad messages name the line.
    with pytest.raises(DataError, match="set --config.chat_template=True"):
        list(text_lib.sequences([str(src)], plain, 11, "messages"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": 5}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 1: no string field 'messages'"):
        list(text_lib.sequences([str(bad)], tok, 11, "messages"))
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 1, field 'messages', message 0: expected"):
        list(text_lib.sequences([str(bad)], tok, 11, "messages"))
    with pytest.raises(DataError, match="seq_len 4 is too short for the chat template"):
        list(text_lib.sequences([str(src)], tok, 4, "messages"))


def test_chat_template_needs_the_turn_pieces(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(  # as the tiny Gemma 2 world's: no chat pieces
        sentence_iterator=iter(["the cat sat on the mat.", "a dog ran under a tree."] * 20),
        model_prefix=str(tmp_path / "tok"),
        vocab_size=60,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        minloglevel=2,
    )
    with pytest.raises(DataError, match=r"tok.model: no <start_of_turn> piece; chat_template needs"):
        tokenizer_lib.SentencePieceTokenizer(str(tmp_path / "tok.model"), chat_template=True)


@pytest.fixture(scope="module")
def chat_store(world, tmp_path_factory):
    """The tiny world's conversations harvested through the chat template (resid, layer 1)."""
    from jumprelu.harvest.run import harvest

    path = tmp_path_factory.mktemp("chat") / "store"
    result = harvest(_cfg(world, "chat_template=True", store=str(path)))
    return {"path": path, "rows": result["rows"]}


def test_harvest_plain_and_chat_store_only_content_tokens(world, chat_store, tmp_path):
    from jumprelu.harvest.contexts import store_contexts
    from jumprelu.harvest.run import harvest

    plain = harvest(_cfg(world, sites=("resid", "attn"), store=str(tmp_path / "plain_{site}")))
    seqs = text_lib.sequences([str(world["dir"] / "train.txt")], world["tok"], 32, split_paragraphs=True)
    assert plain["rows"] == sum(int(text_lib.keep_mask(s, world["tok"].special).sum()) for s in seqs)
    meta = open_store(str(tmp_path / "plain_attn")).metadata
    assert (meta["model"], meta["d_model"], meta["extra"]["chat_template"]) == ("tiny_gemma3", 64, False)

    # Rows: one per content token of the conversations, counted from the tokenizer alone.
    content = collections.Counter()
    with open(world["dir"] / "chat.jsonl") as f:
        for line in f:
            for turn in tokenizer_lib._gemma_turns(json.loads(line)["messages"]):
                content.update(world["tok"].encode(turn[1]))
    assert chat_store["rows"] == sum(content.values())
    store = open_store(str(chat_store["path"]))
    assert store.metadata["extra"]["chat_template"] is True
    # The stored rows' tokens, replayed from the metadata (jumprelu.harvest.contexts), are
    # exactly the content tokens: no template piece, BOS or EOS among them.
    coords = np.array([(s, r) for s, n in enumerate(store.shard_rows) for r in range(n)])
    ctx = store_contexts(str(chat_store["path"]), before=0, after=0)(coords)
    assert collections.Counter(c["token_ids"][c["position"]] for c in ctx) == content


def test_end_to_end_gemma3_it_harvest_train_evaluate_with_delta_lm_loss(world, chat_store, tmp_path):
    # The commands run on one CPU device: 8 simulated ones on 2 cores double their time, and the
    # split LM is exercised in-process (chat_store's harvest, the tests of test_gemma.py).
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env = dict(os.environ, XLA_FLAGS=flags)
    run = tmp_path / "run"
    train = [sys.executable, "-m", "jumprelu", "train", "--config", "quickstart", "--workdir", str(run)]
    train += [
        f"--config.data.source={chat_store['path']}",
        "--config.data.eval_rows=256",
        "--config.sae.width=128",
        "--config.train.steps=60",
        "--config.train.batch_size=128",
        "--config.train.lr_warmup_steps=10",
        "--config.train.sparsity_warmup_steps=20",
        "--config.ckpt.every_steps=60",
        "--config.log.progress=False",
    ]
    out = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    # Evaluated on the chat texts through the template: only content positions are scored.
    ev = [sys.executable, "-m", "jumprelu", "evaluate", "--workdir", str(run)]
    ev += ["--lm", f"harvest/gemma3:tiny={world['dir']},layer=1,site=resid,chat_template=True"]
    ev += ["--lm.eval.sequences=8"]  # the tiny world's held-out conversations (chat_eval.jsonl)
    out = subprocess.run(ev, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    with open(run / "eval.json") as f:
        lm = json.load(f)["lm"]
    tok = tokenizer_lib.SentencePieceTokenizer(str(world["dir"] / "tok.model"), chat_template=True)
    seqs = list(text_lib.sequences([str(world["dir"] / "chat_eval.jsonl")], tok, 32, "messages"))[:8]
    scored = sum(int((text_lib.keep_mask(s, tok.special)[:-1] & (s[1:] != tok.special.pad)).sum()) for s in seqs)
    assert lm["scored_tokens"] == scored and lm["sequences"] == 8
    assert lm["ce_zero_ablated"] != lm["ce_clean"]
    assert lm["delta_lm_loss"] == pytest.approx(lm["ce_spliced"] - lm["ce_clean"])
    assert 0 < lm["l0"] < 128 and lm["fvu"] < 1.5


def test_config_argument():
    from jumprelu.experiments.harvest.gemma3 import get_config
    from jumprelu.harvest.run import harvest_sites

    c = get_config("model=gemma3_12b_it,sites=resid+mlp+attn,layers=12+24,chat_template=True")
    assert (c.model, c.chat_template) == ("gemma3_12b_it", True)
    assert harvest_sites(c)[:3] == [("resid", 12), ("mlp", 12), ("attn", 12)]
    assert (get_config("model=gemma3_27b_pt").layer, get_config().layer, get_config("layer=5").layer) == (31, 17, 5)
    assert get_config().chat_template is False and get_config("chat_template").chat_template is True
    with pytest.raises(ConfigError, match="chat_template='yes please': expected true or false"):
        get_config("chat_template=yes please")
    t = get_config("tiny=/w,chat_template=True")
    assert (t.model, t.texts, t.text_field) == ("tiny_gemma3", ("/w/chat.jsonl",), "messages")
    assert t.eval.texts == ("/w/chat_eval.jsonl",)  # held-out conversations, not the plain eval texts
    from jumprelu.experiments.harvest import gemma2

    assert gemma2.get_config("model=gemma2_2b,chat_template=True").chat_template is True
    assert (t.dtype, t.layer, t.split_paragraphs) == ("float32", 1, False)
    assert get_config("tiny=/w").texts == ("/w/train.txt",)
