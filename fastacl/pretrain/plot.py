"""curves.png: a run's loss terms, learning rate and augmentation strength per epoch."""

from __future__ import annotations

import os
from pathlib import Path


def plot_curves(records: list[dict], path: Path) -> None:
    """Each loss term, lr and augmentation strength per epoch, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    terms = [k for k in ("total", "natural", "adversarial", "sir", "air") if k in records[0]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in terms:
        axes[0].plot(epochs, [r[name] for r in records], marker=".", label=name)
    axes[0].set_title("loss terms")
    axes[0].legend()
    axes[1].plot(epochs, [r["lr"] for r in records], marker=".")
    axes[1].set_title("learning rate (end of epoch)")
    axes[2].plot(epochs, [r["strength"] for r in records], marker=".", label="strength s")
    axes[2].plot(epochs, [r["w"] for r in records], marker=".", label="w")
    axes[2].set_title("augmentation strength and w")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")  # written whole, then renamed
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
