"""A report notebook as one offline HTML file: plotly.js embedded, nothing fetched from a CDN
(no require.js, MathJax only when a markdown cell has `$` math), widget outputs left out."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from awqnb.core.files import atomic_write

log = logging.getLogger(__name__)

# The export opens offline: plotly.js is embedded by the notebook (plots.offline_notebook); the lab
# template's require.js (nothing here uses it) and MathJax (unless a markdown cell has `$` math)
# would come from a CDN, and so would the MathJax script plotly's notebook renderer puts before
# every figure (plotly draws without it: it only typesets LaTeX in figure text, which we don't use).
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- if resources.awqnb_mathjax -%}{{ super() }}{%- endif -%}{%- endblock html_head_js_mathjax -%}
"""
_REMOTE_MATHJAX = re.compile(r'<script\b[^>]*\bsrc="https?://[^"]*mathjax[^"]*"[^>]*>\s*</script>\s*', re.I)


def _strip_remote_mathjax(nb) -> int:
    """Remove `<script src="https://…mathjax…">` tags from the notebook's HTML outputs (in memory)."""
    n = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data") or {}
            h = data.get("text/html")
            if h is None:
                continue
            text = "".join(h) if isinstance(h, list) else h
            new, k = _REMOTE_MATHJAX.subn("", text)
            if k:
                data["text/html"] = new
                n += k
    return n


_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _strip_widgets(nb) -> int:
    """Drop widget outputs (tqdm bars from loaders) and the saved widget state: a static report
    cannot drive them, and their presence makes nbconvert load the widget manager from a CDN."""
    n = 0
    for cell in nb.cells:
        outs = cell.get("outputs")
        if not outs:
            continue
        keep = [o for o in outs if _WIDGET_VIEW not in (o.get("data") or {})]
        n += len(outs) - len(keep)
        cell["outputs"] = keep
    nb.metadata.pop("widgets", None)
    return n


def export_html(ipynb: Path, dest: Path, hide_code: bool) -> None:
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(ipynb), as_version=4)
    math = any(c.cell_type == "markdown" and "$" in c.source for c in nb.cells)
    n = _strip_remote_mathjax(nb)
    log.debug("%s: removed %d remote MathJax script(s) from figure outputs", ipynb, n)
    log.debug("%s: left %d widget output(s) out of the HTML", ipynb, _strip_widgets(nb))
    exporter = HTMLExporter(template_name="lab", template_file="awqnb_offline.html.j2",
                            extra_loaders=[jinja2.DictLoader({"awqnb_offline.html.j2": _OFFLINE_TEMPLATE})])
    exporter.exclude_input = hide_code
    exporter.exclude_input_prompt = hide_code
    body, _ = exporter.from_notebook_node(nb, resources={"awqnb_mathjax": math})
    atomic_write(dest, body)
