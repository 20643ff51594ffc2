"""HTML pages (model version report, data quality report) rendered from the Jinja2 templates in
jobs/templates/, with autoescaping: every value from the data (texts, labels, source names, reasons)
is escaped by the template engine, never by hand. The only markup passed in as safe is what our own
code generates: matplotlib figures inlined as PNGs (png_tag), so a page can be mailed or archived as is.

StrictUndefined: a value missing from a template's context raises instead of rendering blank."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, Undefined, select_autoescape
from markupsafe import Markup

TEMPLATES = Path(__file__).with_name("templates")


def png_tag(fig, alt: str) -> Markup:
    """A matplotlib figure as an inline <img> (safe markup, the alt text escaped); the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Markup('<img alt="{}" src="data:image/png;base64,{}">').format(alt, encoded)


def _defined(value) -> None:
    """A filter's input missing from the context raises UndefinedError (str() of a StrictUndefined
    does), as it would printed directly, not a TypeError from format()."""
    if isinstance(value, Undefined):
        str(value)


def fmt(value, spec: str) -> str:
    """`{{ x|fmt(".3f") }}`: Python's format spec (`+.3f`, `.0%`, `,.0f`); None raises like format() does."""
    _defined(value)
    return format(value, spec)


def num(value, digits: int = 3) -> str:
    """`{{ x|num }}`: a fixed-point number, or "-" where the value is None (not measured)."""
    _defined(value)
    return "-" if value is None else f"{value:.{digits}f}"


ENV = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(fmt=fmt, num=num)


def render(template_name: str, **context) -> str:
    """One template of jobs/templates/ rendered with `context` (autoescaped, strict about missing values)."""
    return ENV.get_template(template_name).render(**context)
