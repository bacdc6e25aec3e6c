"""On-the-fly training: the SAE trains on the language model's activations as they are computed.

  jumprelu train --config onthefly:model=gemma2_9b,layer=20,site=resid --workdir RUN \
      --config.data.lm.checkpoint=... --config.data.lm.tokenizer=... --config.data.lm.texts='(...)'

No store: the rows are the harvest's (jumprelu.harvest.run), made by the same functions in the
same order: the texts packed into BOS-led sequences (text.sequences), `batch_sequences` at a
time through the jitted truncated forward (gemma_model.site_fn), BOS/EOS/pad positions dropped
(text.keep_mask). Chunk g of the row producer is LM batch g of the texts read over and over
(pass e reads them the e-th time). In every pass the first `data.eval_rows` rows are held out
(the report's rows, never trained on) and the others train, through the seeded shuffle buffer of
`jumprelu.data.shuffle` (which makes resuming exact). C is estimated from the first
`data.scale_rows` training rows, before shuffling, and recorded in the checkpoint (the `sae`
item's scale, which export uses) and in the run's config as `data.scale`.

The LM and the SAE share the devices: the LM's params are split over all of them
(`gemma_model.device_mesh`) and the SAE uses the `mesh` config; the activations pass through
the host's shuffle buffer between the two. One process only (a multi-host run would need each
host to compute its part of every batch).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from jumprelu.data import LM_SOURCE
from jumprelu.data.shuffle import BufferBatches, ShuffleBuffer
from jumprelu.errors import ConfigError, DataError


class LMRows:
    """The row producer (`data.shuffle.RowProducer`): chunk g = the training rows of LM batch g."""

    def __init__(self, data_cfg):
        import jax.numpy as jnp

        from jumprelu.harvest import gemma_model
        from jumprelu.harvest import run as run_lib
        from jumprelu.harvest import text as text_lib

        cfg = data_cfg.lm
        for field in ("checkpoint", "tokenizer", "texts"):
            if not cfg[field]:
                raise DataError(f"config field data.lm.{field} is empty: set --config.data.lm.{field}=...")
        for path in cfg.texts:  # before the model loads: a typo costs seconds
            if not os.path.isfile(path):
                raise DataError(f"config field data.lm.texts: text source {path}: no such file")
        try:
            self.lm = run_lib.load_lm(cfg)
        except DataError as e:
            raise DataError(f"data.lm: {e}") from None
        self.site = self.lm.sites[0]
        self.d_model = gemma_model.site_width(self.lm.model.config, self.site.name)
        self.eval_rows = int(data_cfg.eval_rows)
        self._cfg, self._text = cfg, text_lib
        self._run = gemma_model.site_fn(self.lm.model, self.site)
        self._jnp = jnp
        # The model's products keep the precision in force where the rows are opened, on every thread:
        # the run traces its SAE at sae.matmul_precision (a thread-local setting) while the shuffle
        # worker computes training rows on its own thread, and the held-out rows and C must come from
        # the same forward pass as the training rows (and one compiled program, not two).
        self._precision = jax.config.jax_default_matmul_precision
        self.tokens_computed = 0  # tokens through the LM (benchmarks read it)

    def _batches(self):
        """Endless (pass, LM batch g, tokens [n, T], training mask, held-out mask), no model involved."""
        cfg, text, special = self._cfg, self._text, self.lm.tokenizer.special
        g, epoch = 0, 0
        while True:
            seqs = text.sequences(list(cfg.texts), self.lm.tokenizer, cfg.seq_len, cfg.text_field, cfg.split_paragraphs)
            seen = 0  # kept rows of this pass so far, in harvest order (sequence-major, then position)
            for _, tokens in text.batches(seqs, cfg.batch_sequences, special):
                keep = text.keep_mask(tokens, special)
                index = seen + np.cumsum(keep).reshape(keep.shape) - 1
                held = keep & (index < self.eval_rows)
                yield epoch, g, tokens, keep & ~held, held
                seen, g = seen + int(keep.sum()), g + 1
            if seen <= self.eval_rows:
                raise DataError(
                    f"config field data.lm.texts: the texts give {seen} rows per pass, all held out by "
                    f"data.eval_rows={self.eval_rows}; add texts or lower data.eval_rows"
                )
            epoch += 1

    def _forward(self, tokens: np.ndarray) -> np.ndarray:
        self.tokens_computed += int(tokens.size)
        with jax.default_matmul_precision(self._precision):
            return np.asarray(self._run(self.lm.params, self._jnp.asarray(tokens)))

    def chunks(self, start: int):
        for _, g, tokens, train, _ in self._batches():
            if g < start:  # skipped by tokenizing only
                continue
            yield self._forward(tokens)[train] if train.any() else np.zeros((0, self.d_model), np.float32)

    def chunk_sizes(self):
        for _, _, _, train, _ in self._batches():
            yield int(train.sum())

    def rows_per_pass(self) -> int:
        """Training rows in one pass over the texts (tokenizes them once, no model)."""
        total = 0
        for epoch, _, _, train, _ in self._batches():
            if epoch:
                return total
            total += int(train.sum())
        raise AssertionError("endless")

    def held_out(self) -> np.ndarray:
        """The first `eval_rows` rows of the texts: [eval_rows, d_model] float32."""
        parts, n = [np.zeros((0, self.d_model), np.float32)], 0
        for _, _, tokens, _, held in self._batches():
            if n >= self.eval_rows:
                break
            if held.any():
                parts.append(self._forward(tokens)[held])
                n += int(held.sum())
        return np.concatenate(parts)

    def first_rows(self, count: int) -> np.ndarray:
        """The first `count` training rows in the producer's order (before shuffling)."""
        parts, n = [], 0
        for rows in self.chunks(0):
            parts.append(rows[: count - n])
            n += len(parts[-1])
            if n >= count:
                return np.concatenate(parts)
        raise AssertionError("endless")


class OnTheFlyRows:
    """What training reads (`data.TrainingRows`): the LM's rows through the shuffle buffer."""

    dtype = "float32"

    def __init__(self, data_cfg, producer: LMRows | None = None):
        self.producer = producer or LMRows(data_cfg)
        self.d_model = self.producer.d_model
        self.buffer = ShuffleBuffer(self.producer, data_cfg.shuffle_buffer_rows, data_cfg.seed)
        self._scale_rows = int(data_cfg.scale_rows)

    @functools.cached_property
    def scale(self) -> float:
        """C with E‖x/C‖² = 1 over the first `data.scale_rows` training rows (deterministic)."""
        rows = self.producer.first_rows(self._scale_rows).astype(np.float64)
        scale = float(np.sqrt(np.mean(np.sum(rows**2, axis=1))))
        if not (np.isfinite(scale) and scale > 0):
            raise DataError(f"data.lm: cannot estimate the scale C from the first rows (mean squared norm {scale**2})")
        return scale

    @functools.cached_property
    def num_train_rows(self) -> int:
        return self.producer.rows_per_pass()

    @functools.cached_property
    def _eval(self) -> np.ndarray:
        return self.producer.held_out()

    def eval_set(self) -> np.ndarray:
        return self._eval

    def read(self, position: int, count: int) -> np.ndarray:
        return self.buffer.read(position, count)

    def batch_iterator(self, *, batch_size: int, part: slice, num_batches: int, start: int = 0) -> BufferBatches:
        return BufferBatches(self.buffer, batch_size=batch_size, part=part, num_batches=num_batches, start=start)

    def close(self) -> None:
        self.buffer.close()


def open_rows(data_cfg, workdir: str | None = None) -> OnTheFlyRows:
    """The on-the-fly rows of `data_cfg` (data.source "lm"), checked (one-line errors) before any forward."""
    del workdir  # nothing is written: that is the point
    if data_cfg.source != LM_SOURCE:
        raise ConfigError(
            f"config field data.source must be {LM_SOURCE!r} for on-the-fly rows, found {data_cfg.source!r}"
        )
    if jax.process_count() > 1:
        raise ConfigError(
            f"data.source {LM_SOURCE!r} runs in one process (found {jax.process_count()}); "
            "harvest a store for a multi-host run (jumprelu harvest)"
        )
    rows = OnTheFlyRows(data_cfg)
    if data_cfg.d_model is not None and data_cfg.d_model != rows.d_model:
        raise ConfigError(
            f"config field data.d_model is {data_cfg.d_model} but site {rows.producer.site.name} of layer "
            f"{rows.producer.site.layer} has width {rows.d_model}"
        )
    return rows


def held_out_rows(data_cfg) -> np.ndarray:
    """The held-out rows of an on-the-fly run (what its report evaluated), recomputed by the LM."""
    return LMRows(data_cfg).held_out()


def train(cfg, workdir: str) -> dict:
    """`jumprelu.train.loop.train` with the on-the-fly rows wired in (what `jumprelu train` calls)."""
    from jumprelu.train import loop

    return loop.train(cfg, workdir, open_rows=open_rows)
