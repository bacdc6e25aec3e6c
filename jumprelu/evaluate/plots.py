"""Training curves as a PNG, from the metrics written during training."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
    ("loss", "loss", "log"),
    ("fvu", "FVU (batch)", "log"),
    ("l0", "L0 (active latents / token)", "linear"),
    ("frac_fired", "latents fired in batch", "linear"),
)


def plot_training_curves(records: list[dict], path: str, title: str = "") -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    steps = [r["step"] for r in records]
    for ax, (key, label, yscale) in zip(axes, PANELS, strict=True):
        ax.plot(steps, [r[key] for r in records], lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.set_yscale(yscale)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(points: list[dict], path: str, title: str = "") -> None:
    """L0 (log axis) against FVU, one curve per `kind`; points: dicts with kind, l0, fvu."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for kind in sorted({p["kind"] for p in points}):
        mine = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["l0"])
        ax.plot([p["l0"] for p in mine], [p["fvu"] for p in mine], marker="o", lw=1.4, label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token, held out)")
    ax.set_ylabel("FVU (held out)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_firing_histogram(freq, path, title: str = "") -> None:
    """Histogram of log10 firing frequency over latents; dead latents (never fired) counted in the title."""
    import numpy as np

    freq = np.asarray(freq)
    alive = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if alive.size:
        ax.hist(np.log10(alive), bins=60, color="C0")
    ax.set_xlabel("log10 firing frequency (share of tokens a latent is active on)")
    ax.set_ylabel("latents")
    ax.axvline(-1, color="C3", lw=1, ls="--")  # the 10% line: dense latents lie right of it
    dead = int((freq == 0).sum())
    ax.set_title(f"{title}  dead: {dead} of {freq.size}".strip(), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
