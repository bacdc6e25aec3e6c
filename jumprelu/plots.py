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
