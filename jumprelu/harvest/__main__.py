"""Harvest Gemma 2 activations at a site into an activation store.

  python -m jumprelu.harvest --config experiments/harvest/gemma2.py:model=gemma2_9b,layer=20,site=resid \
      --config.checkpoint=/path/gemma2-9b --config.tokenizer=/path/tokenizer.model \
      --config.texts='("/data/a.jsonl",)' --config.store=/data/stores/layer20_resid

Reads the texts, tokenises them with the Gemma tokenizer (a local sentencepiece model), packs
them into BOS-led sequences of `seq_len`, runs the model up to the site's layer with its
params sharded over every device, drops BOS/EOS/pad positions and writes the rows to the store
with the model, site, layer, checkpoint, tokenizer and seq_len in its metadata. Several sites
(`sites=resid+mlp+attn,layers=9+20+31` in the config argument, and a store template such as
--config.store='/data/stores/{site}_l{layer}') come from one forward pass. Run the same
command again after an interruption: it continues after the last complete shard, and the
store ends up exactly as an uninterrupted harvest would have written it.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags


def main(argv) -> None:
    del argv
    from jumprelu.errors import DataError
    from jumprelu.harvest.run import harvest

    logging.set_verbosity(logging.WARNING)
    try:
        result = harvest(_CONFIG.value)
    except DataError as e:
        print(f"jumprelu: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))
    for path in result["stores"]:
        print(f"store: {path}  (python -m jumprelu.store summary {path})")


if __name__ == "__main__":  # flags only here: importing this module must not define them
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Harvest config (experiments/harvest/gemma2.py).")
    flags.mark_flags_as_required(["config"])
    app.run(main)
