"""Notebooks -> self-contained HTML, and the clean form in which notebooks are committed.

    python -m slc.render notebooks build/html       # execute every notebook, write HTML + index.html
    python -m slc.render --update notebooks/01_*.ipynb   # execute in place, strip, keep outputs (before a commit)
    python -m slc.render --strip notebooks/*.ipynb  # strip only (what scripts/strip_notebook.py does)

Committed notebooks carry their outputs (nbval compares them) and execution counts
(1, 2, 3, ... after a fresh run; nbval needs them) but no metadata and no embedded JavaScript: a plotly figure is stored as its small
JSON mimetype (`application/vnd.plotly.v1+json`, which JupyterLab draws with the
jupyterlab-plotly extension that the plotly package ships). The HTML written here
is what you share: each page inlines plotly.js once and turns every stored figure
into a live, zoomable plot, so it opens offline, without a kernel. Widgets need a
kernel; in HTML their place shows a note (notebook 04 also draws a static overview
for exactly that reason).
"""
from __future__ import annotations

import argparse
import html
import json
import sys
import time
from pathlib import Path

import nbformat

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
KEEP_NB_METADATA = ("kernelspec",)          # nbval and nbconvert need the kernel name; nothing else
KEEP_LANGUAGE_INFO = ("name",)
TIMEOUT_S = 600                              # per cell: notebook 06 compresses a whole LLM in one cell


# ----------------------------------------------------------------------------
# strip: what a committed notebook looks like

def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop notebook, cell and output metadata (widget state included); keep sources and outputs.

    Execution counts stay: nbval refuses a cell that has outputs but no count ("unrun reference
    cell"), and after a fresh top-to-bottom run they are simply 1, 2, 3, ... so they never churn.
    Works in place and returns the notebook.
    """
    meta = nb.metadata
    kept = {k: meta[k] for k in KEEP_NB_METADATA if k in meta}
    if "language_info" in meta:
        kept["language_info"] = {k: meta["language_info"][k] for k in KEEP_LANGUAGE_INFO if k in meta["language_info"]}
    nb.metadata = nbformat.from_dict(kept)
    for cell in nb.cells:
        cell.metadata = nbformat.from_dict({})
        if cell.cell_type != "code":
            cell.pop("outputs", None)
            cell.pop("execution_count", None)
            continue
        for out in cell.outputs:
            if "metadata" in out:
                out.metadata = nbformat.from_dict({})
    return nb


def strip_file(path: Path) -> bool:
    """Strip a notebook file in place; True when it changed."""
    text = Path(path).read_text(encoding="utf-8")
    nb = strip(nbformat.reads(text, as_version=4))
    new = nbformat.writes(nb) + "\n"
    if new != text:
        Path(path).write_text(new, encoding="utf-8")
        return True
    return False


# ----------------------------------------------------------------------------
# execute: a fresh kernel per notebook, cwd = the notebook's folder (as nbval does)

def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = TIMEOUT_S) -> nbformat.NotebookNode:
    """Run every cell top to bottom in a fresh python3 kernel; raises CellExecutionError on the first error."""
    from nbconvert.preprocessors import ExecutePreprocessor

    ep = ExecutePreprocessor(timeout=timeout, kernel_name="python3", store_widget_state=False)
    ep.preprocess(nb, {"metadata": {"path": str(cwd)}})
    return nb


def update(path: Path, timeout: int = TIMEOUT_S) -> float:
    """Execute a notebook in place and strip it: the form to commit. Returns seconds taken."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    execute(nb, path.parent, timeout)
    dt = time.perf_counter() - t0
    path.write_text(nbformat.writes(strip(nb)) + "\n", encoding="utf-8")
    return dt


# ----------------------------------------------------------------------------
# HTML

_TEMPLATE = r"""
{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<script type="text/javascript">{{ resources.slc_plotly_js }}</script>
<style>.slc-widget-note{color:#666;font-style:italic;padding:4px 0}</style>
{%- endblock extra_css -%}
"""

_WIDGET_NOTE = ('<div class="slc-widget-note">[interactive widget: open this notebook in JupyterLab '
                '(<code>make lab</code>) to use it]</div>')


def _figure_html(spec: dict) -> str:
    import plotly.io as pio

    fig = pio.from_json(json.dumps(spec), skip_invalid=True)
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, config={"responsive": True})


def html_ready(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Give plotly outputs an HTML form and replace widget views by a note (on a copy)."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    nb.metadata.pop("widgets", None)            # widget state would pull the widget manager from a CDN
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if PLOTLY_MIME in data:
                data["text/html"] = _figure_html(data[PLOTLY_MIME])
                data.pop("text/plain", None)
            elif WIDGET_MIME in data:
                out["data"] = {"text/html": _WIDGET_NOTE}
    return nb


def to_html(nb: nbformat.NotebookNode, title: str) -> str:
    """A self-contained page: plotly.js inlined once, no CDN scripts."""
    import jinja2
    from nbconvert import HTMLExporter
    from plotly.offline import get_plotlyjs

    exporter = HTMLExporter(template_name="lab", template_file="slc_index.html.j2",
                            extra_loaders=[jinja2.DictLoader({"slc_index.html.j2": _TEMPLATE})])
    nb = html_ready(nb)
    nb.metadata["title"] = title
    body, _ = exporter.from_notebook_node(nb, resources={"slc_plotly_js": get_plotlyjs()})
    return body


def notebook_title(nb: nbformat.NotebookNode, fallback: str) -> str:
    """The first markdown heading, without its #s."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return fallback


def takeaway(nb: nbformat.NotebookNode) -> str:
    """The text after a '**Main takeaway**' marker in the first markdown cell that has one."""
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "main takeaway" in cell.source.lower():
            for line in cell.source.splitlines():
                if "main takeaway" in line.lower():
                    return line.split(":", 1)[-1].replace("**", "").strip()
    return ""


def _inline_markdown(text: str) -> str:
    """One paragraph of markdown (emphasis, code) as inline HTML."""
    from nbconvert.filters import markdown2html

    out = markdown2html(text).strip()
    return out.removeprefix("<p>").removesuffix("</p>")


def _index_html(rows: list[dict]) -> str:
    items = []
    for r in rows:
        status = "" if r["ok"] else ' <b style="color:#b00">(failed: see the page)</b>'
        took = f' <span class="s">(ran in {r["seconds"]:.0f} s)</span>' if r["seconds"] >= 0.5 else ""
        items.append(f'<li><a href="{html.escape(r["href"])}">{html.escape(r["title"])}</a>{status}'
                     f'<br><span class="t">{_inline_markdown(r["takeaway"])}</span>{took}</li>')
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>slc notebooks</title>"
            "<style>body{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.5}"
            "li{margin-bottom:1em}.t{color:#444}.s{color:#999;font-size:85%}</style></head><body>"
            "<h1>slc notebooks</h1><p>Executed and rendered by <code>make render</code>; "
            "figures are interactive and work offline.</p><ol>" + "".join(items) + "</ol></body></html>\n")


def render(src: Path, dest: Path, execute_cells: bool = True, timeout: int = TIMEOUT_S,
           only: list[str] | None = None) -> list[dict]:
    """Execute (optionally) and render every notebook in `src` to `dest`; write dest/index.html.

    `only`: render just the notebooks whose file name contains one of these (index left as it is).
    """
    from nbconvert.preprocessors import CellExecutionError

    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in sorted(src.glob("*.ipynb")):
        if only and not any(o in path.name for o in only):
            continue
        nb = nbformat.read(path, as_version=4)
        ok, t0 = True, time.perf_counter()
        if execute_cells:
            try:
                execute(nb, path.parent, timeout)
            except CellExecutionError as e:     # render what ran, show the error, carry on with the others
                ok = False
                print(f"{path.name}: FAILED\n{str(e)[-2000:]}", file=sys.stderr)
        seconds = time.perf_counter() - t0
        title = notebook_title(nb, path.stem)
        out = dest / (path.stem + ".html")
        out.write_text(to_html(nb, title), encoding="utf-8")
        rows.append({"href": out.name, "title": title, "takeaway": takeaway(nb), "seconds": seconds, "ok": ok})
        print(f"{path.name}: {'ok' if ok else 'FAILED'} in {seconds:.1f} s -> {out} "
              f"({out.stat().st_size / 1e6:.1f} MB)", flush=True)
    if not only:                                 # a partial run leaves the full index alone
        (dest / "index.html").write_text(_index_html(rows), encoding="utf-8")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slc.render", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="SRC DEST to render; notebook files with --update / --strip")
    p.add_argument("--update", action="store_true", help="execute the given notebooks in place and strip them")
    p.add_argument("--strip", action="store_true", help="strip the given notebooks in place")
    p.add_argument("--no-execute", action="store_true", help="render stored outputs without running")
    p.add_argument("--only", nargs="*", help="render only notebooks whose file name contains one of these")
    p.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per cell")
    a = p.parse_args(argv)
    if a.update or a.strip:
        for path in map(Path, a.paths):
            if a.update:
                print(f"{path}: executed in {update(path, a.timeout):.1f} s, "
                      f"{path.stat().st_size / 1e3:.0f} KB", flush=True)
            else:
                print(f"{path}: {'stripped' if strip_file(path) else 'already clean'}")
        return 0
    if len(a.paths) != 2:
        p.error("rendering needs exactly two paths: SRC_FOLDER DEST_FOLDER")
    rows = render(Path(a.paths[0]), Path(a.paths[1]), not a.no_execute, a.timeout, a.only)
    if not rows:
        print(f"no notebooks found in {a.paths[0]}", file=sys.stderr)
        return 1
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
