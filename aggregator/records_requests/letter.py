"""One template, two renderings: the letter's text (Jinja2) and the same text as a PDF (fpdf2).

The PDF is laid out from the rendered text line by line, so what a navigator reads in the
terminal is exactly what the records department receives. A Unicode TrueType font is used when
the system has one (names are not always Latin-1); otherwise characters outside Latin-1 are
replaced and the letter says so in its metadata, never silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

_FONTS = (Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
          Path("/usr/share/fonts/dejavu/DejaVuSans.ttf"))
# escaping applies to HTML templates only: the letter is plain text, escaped entities would show
_env = jinja2.Environment(loader=jinja2.PackageLoader("aggregator.records_requests", "templates"),
                          autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
                          keep_trailing_newline=True, undefined=jinja2.StrictUndefined)


def render_text(context: Mapping[str, Any]) -> str:
    """The letter as plain text (the template's only rendering)."""
    return _env.get_template("letter.txt.j2").render(**context)


def render_pdf(text: str, title: str) -> bytes:
    """The letter text laid out on A4/Letter-safe margins as a text-extractable PDF."""
    from fpdf import FPDF

    pdf = FPDF(format="letter")
    pdf.set_margins(22, 20, 22)
    pdf.set_auto_page_break(True, margin=20)
    pdf.set_title(title)
    pdf.set_creator("second-opinion-aggregator")
    font = next((f for f in _FONTS if f.is_file()), None)
    if font is not None:
        pdf.add_font("letter", "", str(font))
        pdf.set_font("letter", size=10.5)
    else:
        pdf.set_font("Helvetica", size=10.5)
        pdf.set_subject("characters outside Latin-1 replaced by '?'")
        text = text.encode("latin-1", "replace").decode("latin-1")
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin
    for raw in text.splitlines():
        pdf.multi_cell(width, 5.2, raw if raw.strip() else " ", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
