"""Notebook 04 in a real browser: JupyterLab + headless Chromium, run all, move a widget, see the plot change.

    make browser-test        (pytest tests/browser -m browser)

A screenshot of the explorer after the change goes to build/browser-04.png.

It waits only on what JupyterLab and the Jupyter server guarantee: the kernel's execution_state from
the server's REST API (GET /api/sessions), every code cell's execution count in its prompt, and the
rendered plots themselves; never on the status bar, which shows the kernel state only once a cell has
focus. It skips where Chromium or chromedriver is absent; where they are present it runs and can fail.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

NOTEBOOK = ROOT / "notebooks" / "04_layer_quality_widgets.ipynb"
SHOT = ROOT / "build" / "browser-04.png"
PLOTS = ".slc-explorer .js-plotly-plot"
N_PLOTS = 4

# A fingerprint of what the explorer's four plots hold, read from the page: each trace's type,
# its data (typed arrays turned into plain lists) and each figure's title.
FINGERPRINT_JS = """
const plots = Array.from(document.querySelectorAll(arguments[0]));
const plain = v => (ArrayBuffer.isView(v) ? Array.from(v) : v);
return JSON.stringify(plots.map(el => ({
    title: (el.layout && el.layout.title && el.layout.title.text) || '',
    traces: (el.data || []).map(t => ({type: t.type, x: plain(t.x), y: plain(t.y),
                                       z: t.z ? Array.from(t.z, r => plain(r)) : null})),
})));
"""


def _wait(what: str, fn, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _click_menu(driver, menu: str, command: str) -> None:
    """Open a main-menu menu and click one of its commands once it is enabled."""
    from selenium.webdriver.common.by import By

    labels = driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel")
    next(el for el in labels if el.text.strip() == menu).click()
    item = _wait(f"menu item {command} to be enabled", lambda: driver.find_elements(
        By.CSS_SELECTOR, f'.lm-Menu-item[data-command="{command}"]:not(.lm-mod-disabled)'), 20)
    item[0].click()


# What the page shows of a run: the text of every code cell's input prompt ("[ ]:", "[*]:", "[3]:")
# and the text of every error shown (JupyterLab renders error outputs with the stderr mimetype).
CELLS_JS = """
const prompts = Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt'))
    .map(e => e.textContent.trim());
const errors = Array.from(document.querySelectorAll(
    ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"))
    .map(e => e.innerText).filter(t => t.includes('Traceback') || t.includes('Error'));
return {prompts: prompts, errors: errors};
"""
NUMBERED = re.compile(r"^\[\d+\]:?$")


def _all_cells_ran(driver, lab, n_code: int) -> bool:
    """True once every code cell shows an execution count and the server says the kernel is idle.

    A count appears only when that cell's execute reply has arrived, so nothing here depends on
    the status bar, on focus or on catching the short 'busy' phase. Fails at once on an error.
    """
    page = driver.execute_script(CELLS_JS)
    assert not page["errors"], f"a cell failed in the browser:\n{page['errors'][0][:2000]}"
    prompts = page["prompts"]
    done = len(prompts) == n_code and all(NUMBERED.match(p) for p in prompts)
    return done and lab.kernel_state(NOTEBOOK.name) == "idle"


def test_explorer_updates_plots_in_jupyterlab(lab, chrome):
    try:
        _drive(lab, chrome)
    except Exception:
        # leave evidence: a picture of the page and the text of every output
        SHOT.parent.mkdir(parents=True, exist_ok=True)
        chrome.save_screenshot(str(SHOT.with_name("browser-04-failure.png")))
        outs = chrome.execute_script("return Array.from(document.querySelectorAll('.jp-OutputArea-output'))"
                                     ".map(e => e.innerText.slice(0, 300));")
        print("outputs on the page:\n" + "\n---\n".join(outs or []))
        raise


def _drive(lab, chrome) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    # a clean copy of notebook 04: no stored outputs, so every plot on the page comes from this run
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, lab.root / NOTEBOOK.name)
    n_code = sum(cell.cell_type == "code" for cell in nb.cells)

    driver = chrome
    driver.get(lab.url(f"lab/tree/{NOTEBOOK.name}"))
    _wait(f"the notebook to open with its {n_code} code cells", lambda: len(driver.find_elements(
        By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell")) == n_code, 120)
    # the kernel: ask the server (REST), not the status bar, which shows the state only once a cell has focus
    _wait("the notebook's kernel to be idle (GET /api/sessions)",
          lambda: lab.kernel_state(NOTEBOOK.name) == "idle", 120)

    _click_menu(driver, "Run", "runmenu:run-all")
    _wait("the run to start (a prompt showing [*] or a count)", lambda: any(
        p.startswith("[*]") or NUMBERED.match(p) for p in driver.execute_script(CELLS_JS)["prompts"]), 30, poll=0.2)
    _wait("every code cell to show its execution count, and the kernel to be idle",
          lambda: _all_cells_ran(driver, lab, n_code), 300)
    _wait(f"{N_PLOTS} explorer plots", lambda: len(driver.find_elements(By.CSS_SELECTOR, PLOTS)) >= N_PLOTS, 60)

    explorer = driver.find_element(By.CSS_SELECTOR, ".slc-explorer")
    summary = explorer.find_element(By.CSS_SELECTOR, ".widget-html-content")
    before, summary_before = driver.execute_script(FINGERPRINT_JS, PLOTS), summary.text
    assert '"type":"heatmap"' in before and '"type":"bar"' in before, "the explorer plots hold no data"

    # move a widget: pick another layer (a 1536 x 384 MLP weight instead of a 384 x 384 attention one)
    layer = Select(explorer.find_elements(By.CSS_SELECTOR, "select")[0])
    target = next(o for o in layer.options if "intermediate" in o.text)
    layer.select_by_visible_text(target.text)

    after = _wait("the plots to change", lambda: (
        (fp := driver.execute_script(FINGERPRINT_JS, PLOTS)) != before and "intermediate" in summary.text and fp), 120)
    assert after != before
    assert summary.text != summary_before and "intermediate" in summary.text

    SHOT.parent.mkdir(parents=True, exist_ok=True)
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", explorer)
    time.sleep(1.0)                                  # let plotly finish its transition before the picture
    driver.save_screenshot(str(SHOT))
    assert SHOT.stat().st_size > 10_000
