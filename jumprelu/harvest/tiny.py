"""A tiny Gemma 2 or Gemma 3 world for tests and the README's end-to-end: tokenizer, checkpoint, texts.

  python -m jumprelu.harvest.tiny DIR [--family gemma3]

writes DIR/tok.model (a sentencepiece tokenizer trained here, Gemma's special ids: pad 0,
eos 1, bos 2, unk 3), DIR/ckpt (a 2-layer model of the family with random weights, saved in
the official release's flat checkpoint layout), DIR/train.txt and DIR/eval.jsonl (random
sentences over a small vocabulary). Then `harvest/gemma2:tiny=DIR` (or `harvest/gemma3:tiny=DIR`)
points a harvest or an LM evaluation at them.

Gemma 3's world stands in for the real one where it differs: its tokenizer keeps newlines
(identity normalisation, as Gemma's) and has the chat pieces <start_of_turn> and <end_of_turn>
as single tokens, its model has QK norm and no soft-caps (tiny_config), and
DIR/chat.jsonl holds conversations ({"messages": [{role, content}, ...]}) for an `it`-style
harvest with the chat template, DIR/chat_eval.jsonl other ones for its LM evaluation.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

WORDS = "the a cat dog sat ran on under mat tree quickly slowly red blue big small and then it was".split()


def _paragraphs(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 30))) + "." for _ in range(n)]


def _conversations(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        turns = [{"role": "system", "content": "be brief."}] if rng.random() < 0.3 else []
        for i in range(int(rng.integers(1, 4)) * 2):
            words = " ".join(rng.choice(WORDS, size=rng.integers(3, 12)))
            turns.append({"role": "user" if i % 2 == 0 else "model", "content": words + "."})
        out.append({"messages": turns})
    return out


def tiny_config(vocab_size: int, num_layers: int = 2, embed_dim: int = 64, family: str = "gemma2"):
    """A config small enough for tests with its family's features.

    gemma2: alternating local/global attention, GQA, post-attention and post-FFW norms, logit
    soft-caps, as in 2B/9B/27B. gemma3: QK norm, no soft-caps, transposed gating einsum,
    local/global RoPE bases 10K/1M with the global scale factor 8 of 4B-27B; its layers
    alternate local/global too (not 5:1), so that two layers exercise both kinds.
    """
    from jumprelu.errors import DataError
    from jumprelu.harvest.gemma_model import FAMILIES, gm

    if family not in FAMILIES:
        raise DataError(f"unknown tiny model family {family!r}: expected one of {FAMILIES}")
    kinds = (gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL)
    common = dict(
        num_embed=vocab_size,
        embed_dim=embed_dim,
        hidden_dim=2 * embed_dim,
        num_heads=4,
        head_dim=16,
        num_kv_heads=2,
        attention_types=tuple(kinds[i % 2] for i in range(num_layers)),
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        query_pre_attn_norm=gm.nn.config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
        sliding_window_size=8,
    )
    if family == "gemma3":  # QK norm, no soft-caps, Gemma 3's RoPE bases and gating layout
        return gm.nn.config.TransformerConfig(
            **common,
            final_logit_softcap=None,
            attn_logits_soft_cap=None,
            use_qk_norm=True,
            transpose_gating_einsum=True,
            local_base_frequency=10_000,
            global_base_frequency=1_000_000,
            global_scale_factor=8.0,
            vision_encoder=None,
        )
    return gm.nn.config.TransformerConfig(**common, final_logit_softcap=30.0, attn_logits_soft_cap=50.0)


def make(directory: str, num_layers: int = 2, embed_dim: int = 64, family: str = "gemma2") -> dict:
    import jax
    import jax.numpy as jnp
    import sentencepiece as spm

    from jumprelu.harvest import gemma_model
    from jumprelu.harvest import tokenizer as tokenizer_lib

    if family not in gemma_model.FAMILIES:
        raise ValueError(f"unknown family {family!r}: expected one of {gemma_model.FAMILIES}")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "train.txt"), "w") as f:
        f.write("\n\n".join(_paragraphs(0, 300)))
    with open(os.path.join(directory, "eval.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in _paragraphs(1, 40))
    gemma3 = {}
    if family == "gemma3":
        with open(os.path.join(directory, "chat.jsonl"), "w") as f:
            f.writelines(json.dumps(c) + "\n" for c in _conversations(3, 60))
        with open(os.path.join(directory, "chat_eval.jsonl"), "w") as f:  # held out: the LM evaluation's
            f.writelines(json.dumps(c) + "\n" for c in _conversations(4, 12))
        gemma3 = dict(
            user_defined_symbols=[tokenizer_lib.START_OF_TURN, tokenizer_lib.END_OF_TURN],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
        )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_paragraphs(2, 200)),
        model_prefix=os.path.join(directory, "tok"),
        vocab_size=320,  # byte fallback needs 256 bytes + specials + the corpus's characters
        model_type="bpe",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        byte_fallback=True,
        add_dummy_prefix=False,
        minloglevel=2,
        **gemma3,
    )
    tok = tokenizer_lib.SentencePieceTokenizer(os.path.join(directory, "tok.model"))
    config = tiny_config(tok.vocab_size, num_layers, embed_dim, family)
    name = {v: k for k, v in gemma_model.TINY.items()}[family]
    model = gemma_model.make_model(name, config, dtype=jnp.float32)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    ckpt = os.path.join(directory, "ckpt")
    if not os.path.exists(ckpt):
        gm = gemma_model.gm
        flat = gm.ckpts._checkpoint._nested_to_flat(params)  # the official release's layout
        gm.ckpts.save_params(flat, os.path.abspath(ckpt), wait_until_finished=True)
    return {"tokenizer": tok, "model": model, "params": params}


if __name__ == "__main__":
    args = sys.argv[1:]
    fam = "gemma2"
    if len(args) == 3 and args[1] == "--family" and args[2] in ("gemma2", "gemma3"):
        fam, args = args[2], args[:1]
    if len(args) != 1:
        sys.exit("usage: python -m jumprelu.harvest.tiny DIR [--family gemma2|gemma3]")
    make(args[0], family=fam)
    extra = ", chat.jsonl, chat_eval.jsonl" if fam == "gemma3" else ""
    print(f"tiny {fam} world in {args[0]}: tok.model, ckpt/, train.txt, eval.jsonl{extra}")
