"""Shared plotting helpers (matplotlib, headless)."""
from __future__ import annotations

import io

from .io.files import write_bytes_atomic


def new_figure(nrows=1, ncols=1, figsize=None, **subplot_kwargs):
    """(figure, axes) like plt.subplots, but a standalone Figure that pyplot never sees: it needs no screen and
    leaves the caller's matplotlib backend alone (a notebook keeps showing its own figures)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **subplot_kwargs)


def save_figure(fig, path) -> None:
    """Save a figure as PNG atomically."""
    image = io.BytesIO()
    fig.tight_layout()
    fig.savefig(image, format="png", dpi=100)
    write_bytes_atomic(path, image.getvalue())
