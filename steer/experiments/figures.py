"""The one way steer writes a figure: a matplotlib `Figure` (never pyplot's global state) saved as
PNG at one resolution, re-saved as a palette image when large (reports stay small in git)."""
from __future__ import annotations

from pathlib import Path

DPI = 110
PNG_LIMIT = 200_000  # bytes; a larger PNG is quantised to 128 colours


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` to `path` (PNG, `DPI`; folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    if path.stat().st_size > PNG_LIMIT:
        from PIL import Image  # Pillow ships with matplotlib

        Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)
    return path
