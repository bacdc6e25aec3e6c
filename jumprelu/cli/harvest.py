r"""jumprelu harvest --config harvest/gemma2[:model=gemma2_9b,layer=20,site=resid] [--config.field=value ...]

  jumprelu harvest --config harvest/gemma2:model=gemma2_9b,layer=20,site=resid \
      --config.checkpoint=/path/gemma2-9b --config.tokenizer=/path/tokenizer.model \
      --config.texts='("/data/a.jsonl",)' --config.store=/data/stores/resid_l20

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

from jumprelu.cli import common

RESUMES = "the harvest resumes after each store's last complete shard"


def run(argv: list[str]) -> int:
    from absl import flags
    from ml_collections import config_flags

    try:
        argv = common.resolve_config_flags(common.underscore_flags(argv))
    except ValueError as e:
        return common.fail(e)
    common.define_experiments_dir_flag(__name__)
    config = config_flags.DEFINE_config_file("config", None, "Harvest config (harvest/gemma2).")
    flags.mark_flags_as_required(["config"])

    def main() -> int:
        from jumprelu.errors import UserError
        from jumprelu.harvest.run import harvest

        common.quiet_libraries(flags.FLAGS)
        try:
            result = harvest(config.value)
        except UserError as e:
            return common.fail(e)
        except (KeyboardInterrupt, OSError) as e:
            if (status := common.resumable_failure(e, RESUMES)) is None:
                raise
            return status
        print(json.dumps(result))
        if result.get("nothing_to_do"):  # a rerun of a finished harvest (a `harvest && train` script, say)
            for path, rows in zip(result["already_complete"], result["num_rows"], strict=True):
                print(f"store: {path} already holds this harvest's {rows:,} rows; nothing to do")
        for path in result["stores"]:
            print(f"store: {path}  (jumprelu store summary {path})")
        return 0

    return common.absl_run(main, argv, "jumprelu harvest")


if __name__ == "__main__":  # python -m jumprelu.cli.harvest is `jumprelu harvest` (it imported this and ran nothing)
    from jumprelu.cli import main_of

    main_of("harvest")
