"""Figures of a run: learning curves (or a head's selection) and the per-track confusion matrix (matplotlib, Agg backend)."""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["plot_curves", "plot_confusion", "plot_selection", "plot_reliability"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, location, name: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    location.write_atomic(name, lambda out: out.write(buf.getvalue()))


def plot_curves(history: Sequence[dict[str, Any]], location, name: str = "curves.png", *, title: str = "") -> None:
    """Training and validation accuracy and loss per epoch (two panels), plus the best epoch."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "accuracy", "accuracy (segments)"), (axes[1], "loss", "loss (cross-entropy)")):
        ax.plot(epochs, [h.get(key) for h in history], "o-", label="train", ms=3)
        ax.plot(epochs, [h.get(f"val_{key}") for h in history], "s-", label="validation", ms=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if history:
            best = min(history, key=lambda h: h.get("val_loss", float("inf")))
            ax.axvline(best["epoch"], color="grey", ls="--", lw=0.8, label=f"best (epoch {best['epoch']})")
        ax.legend(fontsize=8)
    if history:
        axes[0].set_ylim(0, 1.02)
    fig.suptitle(title or "learning curves")
    fig.tight_layout()
    _save(fig, location, name)
    plt.close(fig)


def plot_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str], location,
                   name: str = "confusion_matrix.png", *, title: str = "") -> None:
    """Confusion matrix in tracks (rows: true label, columns: predicted), colour = row share."""
    import numpy as np

    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    n = len(labels)
    size = max(4.0, 0.6 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if m[i, j]:
                ax.text(j, i, int(m[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true label's tracks")
    ax.set_title(title or "confusion matrix (tracks)")
    fig.tight_layout()
    _save(fig, location, name)
    plt.close(fig)


def plot_selection(records: Sequence[dict[str, Any]], location, name: str = "curves.png", *,
                   chosen: dict[str, Any] | None = None, title: str = "", key: str = "val_track_accuracy") -> None:
    """A frozen-backbone head's selection: its track accuracy (``key``: out-of-fold, or validation) against C (log
    scale), one line per candidate embedding; the chosen one marked."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = list(dict.fromkeys(r["candidate"] for r in records))
    for n in names:
        rs = sorted((r for r in records if r["candidate"] == n), key=lambda r: r["c"])
        dims = rs[0]["dims"] if rs else 0
        ax.plot([r["c"] for r in rs], [r[key] for r in rs], "o-", ms=3, label=f"{n} ({dims})")
    if chosen is not None:
        ax.plot([chosen["c"]], [chosen[key]], "k*", ms=14, label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("C (inverse L2 strength)")
    ax.set_ylabel("out-of-fold track accuracy" if key.startswith("oof") else "validation track accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle(title or "head selection")
    fig.tight_layout()
    _save(fig, location, name)
    plt.close(fig)


def plot_reliability(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]], location,
                     name: str = "reliability.png", *, ece_before: float | None = None, ece_after: float | None = None,
                     title: str = "") -> None:
    """The reliability diagram: accuracy against confidence per bin, before and after calibration
    (:func:`genrecls.models.calibration.reliability` data), marker area by tracks in the bin."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    for data, label, style, e in ((before, "before", "o-", ece_before), (after, "after", "s-", ece_after)):
        if not data:
            continue
        x = [b["confidence"] for b in data]
        y = [b["accuracy"] for b in data]
        ax.plot(x, y, style, ms=3, lw=1, label=f"{label} calibration" + (f" (ECE {e:.3f})" if e is not None else ""))
        ax.scatter(x, y, s=[12 * b["tracks"] for b in data], alpha=0.25)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top genre's probability)")
    ax.set_ylabel("accuracy of the tracks in the bin")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, location, name)
    plt.close(fig)
