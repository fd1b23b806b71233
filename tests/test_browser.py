"""The built book as a reader sees it: every page opened in headless Chromium at 1280 px.

The book is built once per test session (``jupyter-book build`` with warnings as errors, every
chapter executed offline), or reused from ``$SAFE_BOOK_HTML`` (a ``_build/html`` folder). Each
chapter must load, show its figures, link to itself in Colab at the configured repository, hold
no error or stderr output, typeset its formulas with the MathJax the site serves itself, and have
no code block wider than its column. A screenshot of every page goes to ``<build>/screenshots/``.

The browser is Debian's ``chromium`` driven by Playwright for Python (``.ci/run`` installs it
where missing); where there is none, Playwright's own Chromium (``playwright install chromium``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from safelib.book import colab

ROOT = Path(__file__).resolve().parent.parent
URL, BRANCH = colab.repository(ROOT / "_config.yml")
SYSTEM_CHROMIUM = Path("/usr/bin/chromium")
WIDTH, HEIGHT = 1280, 900


def toc_files() -> list[str]:
    """Every page of the book in _toc.yml's order (root first), as paths without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [chapter["file"] for chapter in part.get("chapters", [])]
    return files


PAGES = toc_files()
CHAPTERS = [f for f in PAGES if f.startswith("notebooks/")]
NUMBERED = [f for f in CHAPTERS if Path(f).name[:2].isdigit()]  # 01_..., 02_...: the book's chapters


@pytest.fixture(scope="session")
def html_dir(tmp_path_factory) -> Path:
    """The built site: $SAFE_BOOK_HTML, or a fresh strict build in a temporary folder."""
    given = os.environ.get("SAFE_BOOK_HTML")
    if given:
        html = Path(given).resolve()
        assert (html / "index.html").is_file(), f"SAFE_BOOK_HTML={given} holds no index.html"
        return html
    out = tmp_path_factory.mktemp("book")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book if jupyter_book.exists() else shutil.which("jupyter-book") or "jupyter-book"),
               "build", str(ROOT), "--path-output", str(out), "--warningiserror", "--keep-going"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=3600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    (out / "build.log").write_text(result.stdout + result.stderr)
    print(f"\nbook built in {time.perf_counter() - start:.0f} s into {out / '_build/html'}")
    assert result.returncode == 0, f"the book build failed (log: {out / 'build.log'}):\n" + \
        "\n".join((result.stdout + result.stderr).splitlines()[-40:])
    return out / "_build" / "html"


@pytest.fixture(scope="session")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    args = ["--headless", "--no-sandbox", "--disable-gpu"]
    with playwright_api.sync_playwright() as p:
        try:
            if SYSTEM_CHROMIUM.exists():
                chromium = p.chromium.launch(executable_path=str(SYSTEM_CHROMIUM), args=args)
            else:
                chromium = p.chromium.launch(args=args)  # Playwright's own build (GitHub's runners)
        except Exception as error:  # no browser here at all
            if os.environ.get("CI"):
                raise
            pytest.skip(f"no Chromium to drive ({error}); apt-get install chromium")
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def screenshots(html_dir) -> Path:
    folder = html_dir.parent / "screenshots"
    folder.mkdir(exist_ok=True)
    return folder


def open_page(browser, html_dir: Path, page_file: str):
    path = html_dir / f"{page_file}.html"
    assert path.is_file(), f"{path} was not built"
    page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
    errors: list[str] = []
    # sphinx-thebe's loader script comes twice in every sphinx-book-theme page (upstream, harmless)
    page.on("pageerror", lambda error: errors.append(str(error)) if "THEBE_JS_URL" not in str(error) else None)
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_function("() => !window.MathJax || (MathJax.startup && MathJax.startup.promise)")
    page.evaluate("() => window.MathJax ? MathJax.startup.promise : null")
    return page, errors


WIDE_PRE = """() => Array.from(document.querySelectorAll('.bd-article pre'))
    .filter(pre => pre.offsetParent !== null && pre.clientWidth > 0 && pre.scrollWidth > pre.clientWidth + 1)
    .map(pre => `${pre.scrollWidth} > ${pre.clientWidth}: ${pre.textContent.slice(0, 80)}`)"""


@pytest.mark.slow
@pytest.mark.parametrize("page_file", PAGES)
def test_page_loads_without_errors_or_wide_code(browser, html_dir, screenshots, page_file):
    page, errors = open_page(browser, html_dir, page_file)
    try:
        assert page.title() and page.locator("article h1").count() >= 1
        assert errors == [], f"{page_file}: JavaScript errors {errors}"
        assert page.evaluate(WIDE_PRE) == [], f"{page_file}: code blocks wider than the column"
        failed = page.evaluate("""() => Array.from(document.querySelectorAll('.bd-article img'))
            .filter(img => img.src.startsWith('file:') && !(img.complete && img.naturalWidth > 0))
            .map(img => img.src)""")
        assert failed == [], f"{page_file}: images that did not load: {failed}"
        math = page.evaluate("() => document.querySelectorAll('.bd-article .math').length")
        if math:  # formulas on the page: typeset by the MathJax served from the build, none left raw
            src = page.evaluate("() => Array.from(document.scripts).map(s => s.src).find(s => s.includes('tex-chtml'))")
            assert src and src.startswith("file:") and "_static/mathjax/" in src, src
            typeset = page.evaluate("() => document.querySelectorAll('.bd-article mjx-container').length")
            assert typeset >= math, f"{page_file}: {typeset} of {math} formulas typeset"
            assert page.locator("mjx-merror").count() == 0, f"{page_file}: MathJax reported a TeX error"
        page.screenshot(path=str(screenshots / f"{Path(page_file).name}.png"), full_page=True)
    finally:
        page.close()


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_has_figures_a_colab_link_and_no_error_output(browser, html_dir, chapter):
    page, _ = open_page(browser, html_dir, chapter)
    try:
        name = Path(chapter).name
        figures = page.evaluate("() => document.querySelectorAll('.bd-article .cell_output img').length")
        assert figures >= (2 if chapter in NUMBERED else 1), f"{chapter}: {figures} figures"
        target = f"{URL.removeprefix('https://github.com/')}/blob/{BRANCH}/notebooks/{name}.ipynb"
        links = page.evaluate("""() => Array.from(document.querySelectorAll('a'))
            .map(a => a.href).filter(h => h.startsWith('https://colab.research.google.com/github/'))""")
        assert links and all(link.endswith(target) for link in links), (chapter, links)
        assert len(links) >= 2, f"{chapter}: the launch button and the badge should both link to Colab: {links}"
        bad = page.evaluate("""() => document.querySelectorAll(
            '.bd-article .output.stderr, .bd-article .output.traceback, .bd-article .output.error').length""")
        assert bad == 0, f"{chapter}: {bad} error or stderr outputs"
        assert "Traceback (most recent call last)" not in page.inner_text(".bd-article")
    finally:
        page.close()
