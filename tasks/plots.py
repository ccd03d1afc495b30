"""The report's PNGs (val bpb curve, trend): two panels side by side, drawn headless and written atomically."""

from __future__ import annotations

from pathlib import Path

from model.files import atomic_write


def two_panels():
    """(figure, (left axes, right axes)) on the headless Agg backend."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the report's plots need matplotlib; fix: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(10, 4))


def save_png(fig, path: Path, title: str) -> None:
    """Title the figure, write it to `path` through a temp file (no timestamp in it), and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, metadata={"Software": None}))
    finally:
        plt.close(fig)
