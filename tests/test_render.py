"""slc.render as a reader meets it: the seven committed notebooks -> one folder of linked pages + index.html.

Fast: renders from the committed outputs (no kernel), once for the module, into a temporary folder.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from slc import render

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PAGES = [p.stem + ".html" for p in NOTEBOOKS]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """render_all on notebooks/, with execution forbidden: the default must not start a kernel."""
    out = tmp_path_factory.mktemp("html")

    def no_kernel(*args, **kwargs):
        raise AssertionError("render_all executed a notebook without execute=True")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(render, "execute", no_kernel)
        index = render.render_all(ROOT / "notebooks", out, progress=False)
    assert index == out / "index.html"
    return out


def _links(page: str) -> dict[str, str]:
    """rel -> href of the first navigation bar on a page."""
    nav = re.search(r'<nav class="slc-nav">(.*?)</nav>', page, re.S)
    assert nav, "the page has no navigation bar"
    return {m["rel"]: m["href"] for m in re.finditer(r'<a (?=[^>]*rel="(?P<rel>\w+)")(?=[^>]*href="(?P<href>[^"]+)")',
                                                     nav.group(1))}


def test_notebooks_are_numbered_in_order():
    assert len(NOTEBOOKS) >= 8, [p.name for p in NOTEBOOKS]
    assert [p.name[:3] for p in NOTEBOOKS] == [f"{i:02d}_" for i in range(1, len(NOTEBOOKS) + 1)]


def test_index_lists_every_notebook_in_order_with_its_takeaway(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    items = re.findall(r'<li><a href="([^"]+)">(.*?)</a>.*?<span class="t">(.*?)</span></li>', index, re.S)
    assert [href for href, _, _ in items] == PAGES                       # all of them, in file-name order
    for (href, title, takeaway), path in zip(items, NOTEBOOKS, strict=True):
        assert (site / href).is_file()
        nb = nbformat.read(path, as_version=4)
        assert title.startswith(path.stem[:2]) and title == render.notebook_title(nb, "")
        assert len(takeaway) > 40, f"{path.name}: no main takeaway in the index"
        assert "Main takeaway" not in takeaway and "**" not in takeaway     # the marker is dropped, markdown rendered
    assert 'src="http' not in index


def test_each_page_inlines_plotly_once_and_links_index_prev_next(site):
    from plotly.offline import get_plotlyjs

    plotly_head = get_plotlyjs()[:300]                                   # the bundle's licence header and wrapper
    for i, name in enumerate(PAGES):
        page = (site / name).read_text(encoding="utf-8")
        assert page.count(plotly_head) == 1, f"{name}: plotly.js inlined {page.count(plotly_head)} times"
        assert "Plotly.newPlot" in page and 'src="http' not in page and "cdnjs" not in page
        assert page.count('<nav class="slc-nav">') == 2                   # above and below the notebook
        links = _links(page)
        assert links["index"] == "index.html"
        assert links.get("prev") == (PAGES[i - 1] if i > 0 else None), name
        assert links.get("next") == (PAGES[i + 1] if i + 1 < len(PAGES) else None), name
        assert all((site / href).is_file() for href in links.values())


def test_widgets_become_a_note(site):
    page = (site / "04_layer_quality_widgets.html").read_text(encoding="utf-8")
    assert "slc-widget-note" in page and "widget-view+json" not in page


def test_main_renders_a_subset_and_leaves_the_index_alone(tmp_path, capsys):
    assert render.main([str(ROOT / "notebooks"), str(tmp_path), "--only", "02_"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["02_dtype_correct_decompression.html"]
    assert "02_dtype_correct_decompression.ipynb: ok" in capsys.readouterr().out
    links = _links((tmp_path / PAGES[1]).read_text(encoding="utf-8"))
    assert links["prev"] == PAGES[0] and links["next"] == PAGES[2]       # the chain is the full list's


def test_no_notebooks_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no notebooks"):
        render.render_all(tmp_path, tmp_path / "out")
    assert render.main([str(tmp_path), str(tmp_path / "out")]) == 1
    assert "no notebooks" in capsys.readouterr().err


def test_strip_mode_still_works_on_a_committed_notebook(tmp_path, capsys):
    copy = tmp_path / NOTEBOOKS[0].name
    copy.write_bytes(NOTEBOOKS[0].read_bytes())
    assert render.main(["--strip", str(copy)]) == 0
    assert "already clean" in capsys.readouterr().out                    # committed notebooks are stripped
    assert copy.read_bytes() == NOTEBOOKS[0].read_bytes()


@pytest.mark.parametrize(("source", "expected"), [
    ("# T\n\n**Main takeaway:** it works,\nover two lines.\n\nMore.", "it works, over two lines."),
    ("# T\n\n**Main takeaway**: marker outside the bold.", "marker outside the bold."),
    ("# T\n\nNo marker: the first *paragraph*.\n\nMore.", "No marker: the first *paragraph*."),
])
def test_takeaway_from_the_notebook_itself(source, expected):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(source)]
    assert render.takeaway(nb) == expected
