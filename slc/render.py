"""Notebooks -> a folder of linked HTML pages, and the clean form in which notebooks are committed.

    python -m slc.render notebooks build/html            # from the committed outputs (seconds): pages + index.html
    python -m slc.render --execute notebooks build/html  # execute every notebook first (minutes), then render
    python -m slc.render --update notebooks/01_*.ipynb   # execute in place, strip, keep outputs (before a commit)
    python -m slc.render --strip notebooks/*.ipynb       # strip only (what scripts/strip_notebook.py does)

Committed notebooks carry their outputs (nbval compares them) and execution counts
(1, 2, 3, ... after a fresh run; nbval needs them) but no metadata and no embedded JavaScript:
a plotly figure is stored as its small JSON mimetype (`application/vnd.plotly.v1+json`, which
JupyterLab draws with the jupyterlab-plotly extension that the plotly package ships). Because the
outputs are committed, rendering reads them as they are; `--execute` reruns the notebooks first.

The folder written here is what you share (send it, or publish it as a static site): `index.html`
lists the notebooks in order with each one's main takeaway (the notebook's "**Main takeaway:**"
line), and every page links back to the index and to the previous and next notebook. Each page is
self-contained: it inlines plotly.js once and turns every stored figure into a live, zoomable plot,
so it opens offline, without a kernel. Widgets need a kernel; in HTML their place shows a note
(notebook 04 also draws a static overview for exactly that reason).
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
<style>.slc-widget-note{color:#666;font-style:italic;padding:4px 0}
.slc-nav{display:flex;gap:1.5em;justify-content:space-between;font-family:sans-serif;font-size:90%;
padding:8px var(--jp-notebook-padding, 10px);border-bottom:1px solid #ddd}
.slc-nav:last-child{border-bottom:0;border-top:1px solid #ddd}.slc-nav a{text-decoration:none}</style>
{%- endblock extra_css -%}
{%- block body_header -%}{{ super() }}{{ resources.slc_nav }}{%- endblock body_header -%}
{%- block body_footer -%}{{ resources.slc_nav }}{{ super() }}{%- endblock body_footer -%}
"""

_WIDGET_NOTE = ('<div class="slc-widget-note">[interactive widget: open this notebook in JupyterLab '
                '(<code>make lab</code>) to use it]</div>')
INDEX = "index.html"


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


def nav_html(prev_page: tuple[str, str] | None = None, next_page: tuple[str, str] | None = None) -> str:
    """The bar at the top and bottom of a page: previous notebook, the index, next notebook ((href, title) each)."""
    def link(target: tuple[str, str] | None, rel: str, arrow: str) -> str:
        if target is None:
            return "<span></span>"
        text = f"{arrow} {html.escape(target[1])}" if rel == "prev" else f"{html.escape(target[1])} {arrow}"
        return f'<a rel="{rel}" href="{html.escape(target[0])}">{text}</a>'

    return (f'<nav class="slc-nav">{link(prev_page, "prev", "←")}'
            f'<a rel="index" href="{INDEX}">all notebooks</a>{link(next_page, "next", "→")}</nav>')


def to_html(nb: nbformat.NotebookNode, title: str, nav: str = "") -> str:
    """A self-contained page: plotly.js inlined once, no CDN scripts; `nav` (see nav_html) above and below."""
    import jinja2
    from nbconvert import HTMLExporter
    from plotly.offline import get_plotlyjs

    exporter = HTMLExporter(template_name="lab", template_file="slc_index.html.j2",
                            extra_loaders=[jinja2.DictLoader({"slc_index.html.j2": _TEMPLATE})])
    nb = html_ready(nb)
    nb.metadata["title"] = title
    body, _ = exporter.from_notebook_node(nb, resources={"slc_plotly_js": get_plotlyjs(), "slc_nav": nav})
    return body


def notebook_title(nb: nbformat.NotebookNode, fallback: str) -> str:
    """The first markdown heading, without its #s."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return fallback


def _paragraphs(source: str) -> list[str]:
    """A markdown cell's paragraphs (blank-line separated), each joined into one line."""
    paras = [" ".join(line.strip() for line in block.splitlines()) for block in source.split("\n\n")]
    return [p for p in paras if p]


def takeaway(nb: nbformat.NotebookNode) -> str:
    """The notebook's main takeaway, as markdown on one line.

    The paragraph that starts with a "**Main takeaway:**" marker (marker dropped), in the first markdown
    cell that has one; failing that, the first markdown paragraph that is not a heading.
    """
    first = ""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for para in _paragraphs(cell.source):
            plain = para.replace("*", "").replace("_", " ").lstrip()
            if plain.lower().startswith("main takeaway"):
                text = para.split(":", 1)[1] if ":" in para else ""
                return text.removeprefix("**").strip()
            if not first and not para.startswith(("#", "```", "<")):
                first = para
    return first


def _inline_markdown(text: str) -> str:
    """One paragraph of markdown (emphasis, code) as inline HTML."""
    from nbconvert.filters import markdown2html

    out = markdown2html(text).strip()
    return out.removeprefix("<p>").removesuffix("</p>")


def _has_outputs(nb: nbformat.NotebookNode) -> bool:
    return any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")


def _index_html(rows: list[dict], executed: bool) -> str:
    items = []
    for r in rows:
        status = "" if r["ok"] else ' <b class="bad">(failed: see the page)</b>'
        if not r["has_outputs"]:
            status += ' <b class="bad">(no stored outputs: render with --execute)</b>'
        took = f' <span class="s">(ran in {r["seconds"]:.0f} s)</span>' if executed else ""
        items.append(f'<li><a href="{html.escape(r["href"])}">{html.escape(r["title"])}</a>{status}{took}'
                     f'<br><span class="t">{_inline_markdown(r["takeaway"])}</span></li>')
    how = ("each notebook was executed top to bottom in a fresh kernel, then rendered" if executed else
           "rendered from the outputs committed with each notebook (what <code>pytest --nbval</code> checks)")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'><title>slc notebooks</title>"
            "<style>body{font-family:sans-serif;max-width:52em;margin:2em auto;padding:0 1em;line-height:1.5}"
            "li{margin-bottom:1em}.t{color:#444}.s{color:#999;font-size:85%}.bad{color:#b00}</style></head><body>"
            "<h1>slc notebooks</h1><p>Read them in order: each builds on the one before. Every page opens "
            "offline, its figures are interactive, and it links to the previous and next notebook. "
            f"Written by <code>python -m slc.render</code> (<code>make render</code>): {how}.</p>"
            "<ol>" + "".join(items) + "</ol></body></html>\n")


def render(src: Path, dest: Path, execute_cells: bool = False, timeout: int = TIMEOUT_S,
           only: list[str] | None = None, progress: bool = True) -> list[dict]:
    """Render every notebook in `src` (in file-name order) to `dest`, linked in a chain; write dest/index.html.

    By default the committed outputs are rendered as they are; `execute_cells=True` runs each
    notebook in a fresh kernel first. `only`: render just the notebooks whose file name contains
    one of these (their links still point at the full list; the index is left as it is).
    Returns one row per rendered notebook: href, title, takeaway, seconds, ok, has_outputs.
    """
    src, dest = Path(src), Path(dest)
    paths = sorted(src.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {src}")
    dest.mkdir(parents=True, exist_ok=True)
    nbs = [nbformat.read(path, as_version=4) for path in paths]
    chain = [(path.stem + ".html", notebook_title(nb, path.stem)) for path, nb in zip(paths, nbs, strict=True)]
    rows = []
    for i, (path, nb) in enumerate(zip(paths, nbs, strict=True)):
        if only and not any(o in path.name for o in only):
            continue
        ok, t0 = True, time.perf_counter()
        if execute_cells:
            from nbconvert.preprocessors import CellExecutionError

            try:
                execute(nb, path.parent, timeout)
            except CellExecutionError as e:     # render what ran, show the error, carry on with the others
                ok = False
                print(f"{path.name}: FAILED\n{str(e)[-2000:]}", file=sys.stderr)
        seconds = time.perf_counter() - t0
        href, title = chain[i]
        nav = nav_html(chain[i - 1] if i > 0 else None, chain[i + 1] if i + 1 < len(chain) else None)
        out = dest / href
        out.write_text(to_html(nb, title, nav), encoding="utf-8")
        row = {"href": href, "title": title, "takeaway": takeaway(nb), "seconds": seconds, "ok": ok,
               "has_outputs": _has_outputs(nb)}
        rows.append(row)
        if not row["has_outputs"]:
            print(f"{path.name}: warning: no stored outputs; render with --execute", file=sys.stderr)
        if progress:
            ran = f"executed in {seconds:.1f} s, " if execute_cells else ""
            took = time.perf_counter() - t0 - seconds
            print(f"{path.name}: {'ok' if ok else 'FAILED'}, {ran}rendered in {took:.1f} s -> {out} "
                  f"({out.stat().st_size / 1e6:.1f} MB)", flush=True)
    if not only:                                 # a partial run leaves the full index alone
        (dest / INDEX).write_text(_index_html(rows, execute_cells), encoding="utf-8")
    return rows


def render_all(src_dir: str | Path, out_dir: str | Path, execute: bool = False, progress: bool = True) -> Path:
    """Render every notebook in `src_dir` into `out_dir` with an index; return the path of index.html.

    From the committed outputs by default (seconds); `execute=True` runs each notebook first (minutes).
    Raises FileNotFoundError when `src_dir` holds no notebooks, and RuntimeError naming the notebooks
    that failed to execute (their pages and the index are written all the same, showing the error).

    >>> index = render_all("notebooks", "build/html")          # doctest: +SKIP
    >>> index.name
    'index.html'
    """
    rows = render(Path(src_dir), Path(out_dir), execute_cells=execute, progress=progress)
    index = Path(out_dir) / INDEX
    failed = [r["href"] for r in rows if not r["ok"]]
    if failed:
        raise RuntimeError(f"{len(failed)} notebook(s) failed to execute: {', '.join(failed)}; "
                           f"the pages in {out_dir} show the error")
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slc.render", description=__doc__.split("\n\n")[0],
                                epilog="examples:\n" + __doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="SRC DEST to render; notebook files with --update / --strip")
    p.add_argument("--execute", action="store_true",
                   help="execute every notebook in a fresh kernel before rendering (default: committed outputs)")
    p.add_argument("--no-execute", action="store_true", help=argparse.SUPPRESS)   # the default now; kept for old calls
    p.add_argument("--update", action="store_true", help="execute the given notebooks in place and strip them")
    p.add_argument("--strip", action="store_true", help="strip the given notebooks in place")
    p.add_argument("--only", nargs="*", help="render only notebooks whose file name contains one of these")
    p.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per cell when executing")
    p.add_argument("-q", "--quiet", action="store_true", help="no line per notebook")
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
    if a.execute and a.no_execute:
        p.error("--execute and --no-execute contradict each other")
    t0 = time.perf_counter()
    try:
        rows = render(Path(a.paths[0]), Path(a.paths[1]), a.execute, a.timeout, a.only, progress=not a.quiet)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not a.quiet:
        where = Path(a.paths[1]) / INDEX if not a.only else Path(a.paths[1])
        print(f"{len(rows)} notebook(s) in {time.perf_counter() - t0:.1f} s; open {where}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
