"""HTML pieces every report page shares (model version report, data quality report): the style
sheet and matplotlib figures inlined as PNGs, so a page can be mailed or archived as is."""

from __future__ import annotations

import base64
import html
import io


def png_tag(fig, alt: str) -> str:
    """A matplotlib figure as an inline <img>; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child, td.text { text-align: left; }
.pass { background: #e3f5e1; border: 1px solid #7bc47f; padding: 0.6em; }
.fail { background: #fbe3e1; border: 1px solid #d77; padding: 0.6em; }
.muted { color: #777; }
"""
