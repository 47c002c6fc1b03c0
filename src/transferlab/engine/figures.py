"""Figures drawn both while a run is tracked (``engine.tracking``) and in the study report (``results.report``).

Kept here, in the lower layer, so the two draw the same thing from one function.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["draw_confusion", "draw_count_matrix"]


def draw_count_matrix(ax: Any, counts: np.ndarray, share: np.ndarray, labels: list[str], cmap: str, xlabel: str, ylabel: str) -> Any:
    """Draw a K×K matrix of ``counts`` on matplotlib axes ``ax``, coloured by ``share`` (0..1), counts written in when
    it is small; ``labels`` are the tick labels (already escaped for matplotlib). Returns the image artist."""
    n = len(counts)
    im = ax.imshow(share, cmap=cmap, vmin=0, vmax=1)
    if n <= 40:  # past that the tick labels are unreadable
        ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), labels, fontsize=8)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return im


def draw_confusion(ax: Any, cm: np.ndarray, labels: list[str]) -> Any:
    """Draw confusion matrix ``cm`` on matplotlib axes ``ax``, coloured by share of the true class, counts written in
    when it is small; ``labels`` are the tick labels (already escaped for matplotlib). Returns the image artist."""
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)  # a class absent from test: 0
    return draw_count_matrix(ax, cm, share, labels, "Blues", "predicted", "true")
