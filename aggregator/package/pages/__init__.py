"""Building blocks of the consultant's summary page: formatting, lab series, charts, thumbnails.

Each module has one concern and returns plain data (or a finished SVG/PNG); the HTML itself comes
from the Jinja2 templates under ``templates/`` with autoescaping, so nothing from the record can
ever become markup.
"""
