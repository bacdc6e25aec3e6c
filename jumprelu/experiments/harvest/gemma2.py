"""Harvest (and LM evaluation) config for Gemma 2: which model, checkpoint, tokenizer, texts, site.

  jumprelu harvest --config harvest/gemma2:model=gemma2_9b,layer=20,site=resid \
      --config.checkpoint=gs://BUCKET/gemma2-9b --config.tokenizer=/path/tokenizer_gemma2.model \
      --config.texts='("/data/train.jsonl",)' --config.store=/data/stores/gemma2-9b/resid_l20
  jumprelu evaluate --workdir RUN --lm harvest/gemma2:model=gemma2_9b,layer=20,site=resid \
      --lm.checkpoint=... --lm.tokenizer=... --lm.eval.texts='("/data/heldout.jsonl",)'

Hardware: Gemma 2 9B runs on a TPU v5e-8 or larger (bf16 params split over all chips: 18.5 GB,
2.15 GiB per chip). Per chip, batch 8 × 1,024, as XLA plans it (benchmarks/lm_memory.py): the
harvest needs 3.2 / 4.7 / 6.2 GiB at layer 9 / 20 / 31, the evaluation 8.0 GiB, 8.5 GiB with a
131K-wide SAE spliced, 16.0 GiB with a 1M-wide one (use eval.batch_sequences=4 there: 12.0 GiB).
Expected run time (FLOP arithmetic, not measured): the harvest is bound by the forward up to
layer L, about 2·9e9·(L+1)/42 FLOPs per token; on a v5e-8 at 40% of its 1,574 TFLOP/s,
~6·10^4 tokens/s at layer 20, so 8B tokens take ~40 h for layer 20. One pass harvests any set
of sites: the paper's nine (3 sites × layers 9/20/31) cost one forward to layer 31 instead of
nine forwards totalling 189 layers, ~6× less:

  jumprelu harvest \
      --config harvest/gemma2:model=gemma2_9b,sites=resid+mlp+attn,layers=9+20+31 \
      --config.checkpoint=... --config.tokenizer=... --config.texts=... \
      --config.store='/data/stores/gemma2-9b/{site}_l{layer}'

(As XLA plans it, this 9-site pass needs 6.1 GiB per chip on a v5e-8, the same as layer 31's
resid alone: benchmarks/lm_memory.py.)

Argument (comma-separated key=value): model (gemma2_2b | gemma2_9b | gemma2_27b | tiny),
layer, site (resid | mlp | attn); sites=a+b and layers=i+j harvest every pair in one pass;
tiny=DIR uses the tiny world of `python -m jumprelu.harvest.tiny DIR` (model, checkpoint,
tokenizer, texts, and DIR/store_{site}_l{layer} as the store).
"""

from ml_collections import config_dict

from jumprelu.errors import ConfigError
from jumprelu.launch import experiment
from jumprelu.store.format import SITE_STORE_TEMPLATE

ARGS = ("model", "site", "layer", "sites", "layers", "tiny", "chat_template")


def get_config(arg=None):
    args = experiment.parse_arg(arg, ARGS, "harvest/gemma2")
    c = config_dict.ConfigDict()
    c.model = args.get("model", "gemma2_9b")
    c.tiny = dict(num_layers=2, embed_dim=64)  # model=tiny only (tests); vocabulary from the tokenizer
    c.dtype = "bfloat16"  # the LM's params and compute
    c.checkpoint = ""  # gemma orbax checkpoint directory, local or gs://
    c.tokenizer = ""  # sentencepiece .model file
    c.texts = ()  # .txt / .jsonl / token-id .npy files, read in order
    c.text_field = "text"
    c.split_paragraphs = False  # .txt: one document per blank-line-separated paragraph
    # Gemma's chat turns around each text (instruction-tuned checkpoints; harvest/gemma3.py and
    # jumprelu.harvest.text): template tokens are masked like BOS.
    c.chat_template = args.get("chat_template", False)
    if not isinstance(c.chat_template, bool):
        raise ConfigError(f"harvest/gemma2 argument chat_template={c.chat_template!r}: expected true or false")
    c.seq_len = 1024
    c.batch_sequences = 8
    c.site = args.get("site", "resid")
    c.layer = experiment.number(args, "layer", 20, "harvest/gemma2", int)
    # Several sites from one forward pass: every name of `sites` at every layer of `layers`
    # (empty: `site`, `layer`). The argument sites=resid+mlp+attn,layers=9+20+31 sets them.
    c.sites = tuple(_plus_list(args, "sites"))
    c.layers = tuple(int(v) for v in _plus_list(args, "layers"))
    c.store = ""  # output store directory; with several sites, a template with {site} and {layer}
    c.store_dtype = "float32"
    c.shard_rows = config_dict.placeholder(int)
    c.shuffle_seed = 0
    c.max_tokens = config_dict.placeholder(int)  # stop after this many stored rows
    c.progress = True
    # Every host of a slice runs the same command (or set $JUMPRELU_DISTRIBUTED=1): see jumprelu.harvest.run.
    c.mesh = dict(distributed=False)
    # jumprelu evaluate --lm: held-out texts (never the training texts), the paper's 2,048 × 1,024.
    c.eval = dict(texts=(), sequences=2048, batch_sequences=8)
    if "tiny" in args:  # the tiny world for tests and the README's end-to-end
        d = args["tiny"]
        c.model, c.dtype, c.layer = "tiny", "float32", experiment.number(args, "layer", 1, "harvest/gemma2", int)
        c.checkpoint, c.tokenizer = f"{d}/ckpt", f"{d}/tok.model"
        c.texts, c.split_paragraphs, c.seq_len, c.batch_sequences = (f"{d}/train.txt",), True, 32, 4
        c.store, c.shard_rows = f"{d}/store_" + SITE_STORE_TEMPLATE, 256
        c.eval.update(texts=(f"{d}/eval.jsonl",), sequences=16)
    return c


def _plus_list(args, key) -> list[str]:
    return [v for v in str(args.get(key, "")).split("+") if v]
