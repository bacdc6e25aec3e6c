"""A tiny Gemma 2 world for tests and the README's end-to-end: tokenizer, checkpoint, texts.

  jumprelu harvest.tiny DIR

writes DIR/tok.model (a sentencepiece tokenizer trained here, Gemma's special ids: pad 0,
eos 1, bos 2, unk 3), DIR/ckpt (a 2-layer Gemma 2-shaped model with random weights, saved in
the official release's flat checkpoint layout), DIR/train.txt and DIR/eval.jsonl (random
sentences over a small vocabulary). Then `harvest/gemma2:tiny=DIR` points a
harvest or an LM evaluation at them.
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


def make(directory: str, num_layers: int = 2, embed_dim: int = 64) -> dict:
    import jax
    import jax.numpy as jnp
    import sentencepiece as spm

    from jumprelu.harvest import gemma_model
    from jumprelu.harvest import text as text_lib

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "train.txt"), "w") as f:
        f.write("\n\n".join(_paragraphs(0, 300)))
    with open(os.path.join(directory, "eval.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in _paragraphs(1, 40))
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
    )
    tok = text_lib.SentencePieceTokenizer(os.path.join(directory, "tok.model"))
    config = gemma_model.tiny_config(tok.vocab_size, num_layers, embed_dim)
    model = gemma_model.make_model("tiny", config, dtype=jnp.float32)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    ckpt = os.path.join(directory, "ckpt")
    if not os.path.exists(ckpt):
        gm = gemma_model.gm
        flat = gm.ckpts._checkpoint._nested_to_flat(params)  # the official release's layout
        gm.ckpts.save_params(flat, os.path.abspath(ckpt), wait_until_finished=True)
    return {"tokenizer": tok, "model": model, "params": params}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: jumprelu harvest.tiny DIR")
    make(sys.argv[1])
    print(f"tiny Gemma 2 world in {sys.argv[1]}: tok.model, ckpt/, train.txt, eval.jsonl")
