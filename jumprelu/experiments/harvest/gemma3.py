"""Harvest (and LM evaluation) config for Gemma 3, the models of Gemma Scope 2: same fields as
harvest/gemma2.py, plus the chat template for instruction-tuned checkpoints.

  jumprelu harvest --config harvest/gemma3:model=gemma3_4b_pt,layer=17,sites=resid+mlp+attn \
      --config.checkpoint=/ckpts/gemma3-4b-pt --config.tokenizer=/ckpts/tokenizer_gemma3.model \
      --config.texts='("/data/train.jsonl",)' --config.store='/data/stores/gemma3-4b-pt/{site}_l{layer}'
  jumprelu harvest --config harvest/gemma3:model=gemma3_1b_it,layer=13,chat_template=True \
      --config.text_field=messages --config.texts='("/data/chats.jsonl",)' ...

Models (model=gemma3_SIZE_pt | gemma3_SIZE_it: the same architecture; the name is recorded in
the store), layers 0..L-1, and site widths (resid and mlp: d_model; attn: heads × head_dim):

  size   layers  d_model  attn         params (text)      checkpoint (gemma's CheckpointPath)
  270m   18      640      4×256=1024   0.27B, 0.50 GiB   gs://gemma-data/checkpoints/gemma3-270m-{pt,it}
  1b     26      1152     4×256=1024   1.00B, 1.86 GiB   gs://gemma-data/checkpoints/gemma3-1b-{pt,it}
  4b     34      2560     8×256=2048   3.88B, 7.23 GiB   gs://gemma-data/checkpoints/gemma3-4b-{pt,it}
  12b    48      3840     16×256=4096  11.8B, 21.9 GiB   gs://gemma-data/checkpoints/gemma3-12b-{pt,it}
  27b    62      5376     32×128=4096  27.0B, 50.3 GiB   gs://gemma-data/checkpoints/gemma3-27b-{pt,it}

(GiB: bf16, as the harvest loads them, split over every device like Gemma 2's.)

4B, 12B and 27B are multimodal checkpoints; the harvest runs them text only (the vision
encoder is neither built nor restored). The tokenizer (262K vocabulary, for every size) is
gs://gemma-data/tokenizers/tokenizer_gemma3.model; copy it to a local file. The default layer
is the middle one of the model (L // 2).

chat_template=True (for the `it` checkpoints): each text becomes a user turn,
`<start_of_turn>user\\n{text}<end_of_turn>\\n`, and JSONL records may be conversations (a list of
{"role", "content"} under `text_field`, e.g. --config.text_field=messages). Template tokens
are masked like BOS: they are not harvested, not replaced by the SAE and not scored in the LM
evaluation (jumprelu.harvest.text). The option is recorded in the store's metadata.

Argument (comma-separated key=value): model, layer, site, sites=a+b, layers=i+j, chat_template
(True/False) as in harvest/gemma2.py; tiny=DIR uses the tiny Gemma 3 world of
`python -m jumprelu.harvest.tiny DIR --family gemma3` (model tiny_gemma3; with
chat_template=True its texts are DIR/chat.jsonl's conversations).
"""

from jumprelu.errors import ConfigError
from jumprelu.experiments.harvest import gemma2
from jumprelu.launch import experiment

# Layer counts of the released sizes (gemma.gm.nn.Gemma3_*; tests/test_gemma3.py checks them).
LAYERS = {"270m": 18, "1b": 26, "4b": 34, "12b": 48, "27b": 62}


def get_config(arg=None):
    args = experiment.parse_arg(arg, gemma2.ARGS, "harvest/gemma3")
    model = args.get("model", "gemma3_4b_pt")
    size = model.split("_")[1] if model.startswith("gemma3_") and model.count("_") == 2 else ""
    defaults = {"model": model}
    if size in LAYERS and "layer" not in args:
        defaults["layer"] = LAYERS[size] // 2
    passed = {k: v for k, v in {**args, **defaults}.items() if k not in ("tiny", "chat_template")}
    c = gemma2.get_config(",".join(f"{k}={v}" for k, v in passed.items()))
    chat = args.get("chat_template", False)
    if not isinstance(chat, bool):
        raise ConfigError(f"harvest/gemma3 argument chat_template={chat!r}: expected true or false")
    c.chat_template = chat
    if "tiny" in args:  # the tiny Gemma 3 world, laid out as the Gemma 2 one
        d = args["tiny"]
        tiny = gemma2.get_config(f"tiny={d}" + (f",layer={args['layer']}" if "layer" in args else ""))
        for key in ("dtype", "layer", "checkpoint", "tokenizer", "texts", "split_paragraphs", "seq_len"):
            c[key] = tiny[key]
        c.batch_sequences, c.store, c.shard_rows = tiny.batch_sequences, tiny.store, tiny.shard_rows
        c.eval = tiny.eval
        c.model = "tiny_gemma3"
        if c.chat_template:  # conversations to harvest, and held-out ones to evaluate on
            c.texts, c.text_field, c.split_paragraphs = (f"{d}/chat.jsonl",), "messages", False
            c.eval.texts = (f"{d}/chat_eval.jsonl",)
    return c
