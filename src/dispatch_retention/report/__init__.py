"""The report's HTML: one self-contained file (no script, no network) from the evidence pack
(`checks/evidence.py`), through a Jinja2 template with autoescaping and charts drawn as inline
SVG by pygal."""
