"""Notebook 04 in a real browser: JupyterLab + headless Chromium, run all, move a widget, see the plot change.

    make browser-test        (pytest tests/browser -m browser)

A screenshot of the explorer after the change goes to build/browser-04.png.
"""
from __future__ import annotations

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
    from selenium.webdriver.common.by import By

    labels = driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel")
    next(el for el in labels if el.text.strip() == menu).click()
    item = _wait(f"menu item {command}", lambda: driver.find_elements(
        By.CSS_SELECTOR, f'.lm-Menu-item[data-command="{command}"]'), 20)
    item[0].click()


KERNEL_IDLE_JS = ("const s = document.querySelector('.jp-Notebook-ExecutionIndicator');"
                  "return s && s.getAttribute('data-status') === 'idle';")


def test_explorer_updates_plots_in_jupyterlab(lab, chrome):
    try:
        _drive(lab, chrome)
    except Exception:
        # leave evidence: a picture of the page and the text of every output
        SHOT.parent.mkdir(parents=True, exist_ok=True)
        chrome.save_screenshot(str(SHOT.with_name("browser-04-failure.png")))
        outs = chrome.execute_script(
            "return Array.from(document.querySelectorAll('.jp-OutputArea-output')).map(e => e.innerText.slice(0, 300));")
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

    driver = chrome
    driver.get(lab.url(f"lab/tree/{NOTEBOOK.name}"))
    _wait("the notebook to open", lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell"), 120)
    _wait("the kernel to be idle", lambda: driver.execute_script(KERNEL_IDLE_JS), 120)
    _wait("the kernel name in the status bar", lambda: "Idle" in driver.find_element(By.CSS_SELECTOR, "#jp-main-statusbar").text, 120)

    _click_menu(driver, "Run", "runmenu:run-all")
    _wait(f"{N_PLOTS} explorer plots", lambda: len(driver.find_elements(By.CSS_SELECTOR, PLOTS)) >= N_PLOTS, 300)
    _wait("every cell to finish", lambda: driver.execute_script(KERNEL_IDLE_JS) and not driver.find_elements(
        By.XPATH, "//div[contains(@class,'jp-InputPrompt') and contains(text(),'[*]')]"), 300)
    errors = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [e.text for e in errors if "Traceback" in e.text or "Error" in e.text]
    assert not tracebacks, f"a cell failed in the browser:\n{tracebacks[0][:2000]}"

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
