"""Shared plotting helpers (matplotlib, headless)."""
from __future__ import annotations

import io

from .files import write_bytes_atomic


def new_figure(*args, **kwargs):
    """plt.subplots on the non-interactive Agg backend (works without a screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path) -> None:
    """Save a figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    fig.tight_layout()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, image.getvalue())
