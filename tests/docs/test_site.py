"""The built documentation site, checked in headless Chromium and by a crawl of its links.

Needs the site built first (``python -m sphinx -W --keep-going -b html docs docs/_build/html``)
and, for the browser checks, Debian's ``chromium`` and ``chromium-driver`` and the ``selenium``
package. Without them the tests are skipped, so ``pytest tests`` passes before the site is
built; ``TORCH_NTK_REQUIRE_SITE=1`` (set by .ci/run) turns every skip into a failure.
``TORCH_NTK_DOCS_HTML`` points at another build directory; ``TORCH_NTK_DOCS_SCREENSHOTS`` at a
directory to keep the screenshots in.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get("TORCH_NTK_DOCS_HTML", ROOT / "docs" / "_build" / "html"))
REQUIRE = os.environ.get("TORCH_NTK_REQUIRE_SITE", "0") not in ("", "0")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")


def _missing(why: str):
    if REQUIRE:
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def site() -> Path:
    if not (SITE / "index.html").is_file():
        _missing(f"no built site at {SITE}")
    return SITE


@pytest.fixture(scope="module")
def browser(site):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            _missing(f"{path} is missing (apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="torch_ntk-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM          # with the driver's path: no driver download
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = os.environ.get("TORCH_NTK_DOCS_SCREENSHOTS")
    path = Path(out) if out else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _open(browser, page: Path, shots: Path) -> str:
    """Loads a page, waits for its scripts and images, keeps a screenshot; the body's text."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page.as_uri())
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && "
        "Array.from(document.images).every(i => i.complete)"))
    browser.save_screenshot(str(shots / (page.relative_to(SITE).as_posix().replace("/", "_")
                                         .replace(".html", ".png"))))
    return browser.execute_script("return document.body.innerText")


def test_index_page(browser, site, shots):
    text = _open(browser, site / "index.html", shots)
    assert "torch_ntk" in browser.title
    heading = browser.execute_script("return document.querySelector('article h1').innerText")
    assert heading.strip().rstrip("#").strip() == "torch_ntk"
    for entry in ("Installation", "Quick start", "User guide", "Gallery", "API reference"):
        assert entry in text
    # the theme's scripts ran: the navigation bar is laid out
    assert browser.execute_script(
        "return document.querySelector('.bd-header').getBoundingClientRect().height") > 0


def test_api_page(browser, site, shots):
    text = _open(browser, site / "api" / "empirical.html", shots)
    assert browser.title.startswith("Empirical kernels")
    signature = browser.execute_script(
        "return document.getElementById('torch_ntk.empirical_ntk').innerText")
    signature = " ".join(signature.split())
    assert signature.startswith("empirical_ntk(model, x1, x2=None, *, mode='full'"), \
        signature
    assert "by_layer=False" in signature
    # the docstring's sections came through napoleon, with the shapes
    assert "Parameters" in text and "Tensor[N1, N2, K, K]" in text
    assert browser.execute_script(
        "return document.getElementById('torch_ntk.monte_carlo_ntk') !== null")


def test_gallery_page(browser, site, shots):
    page = site / "auto_examples" / "plot_width_convergence.html"
    text = _open(browser, page, shots)
    assert browser.title.startswith("The empirical NTK converges to its infinite-width limit")
    assert "width  2048: relative error" in text           # the script's output, executed
    figures = browser.execute_script(
        "return Array.from(document.querySelectorAll('img.sphx-glr-single-img, "
        "img.sphx-glr-multi-img')).map(i => [i.getAttribute('src'), i.complete, "
        "i.naturalWidth, i.naturalHeight])")
    assert figures, "no figure on the gallery page"
    for src, complete, width, height in figures:
        assert complete and width > 0 and height > 0, f"figure {src} did not load"


def test_every_gallery_example_has_a_figure(site):
    pages = sorted((site / "auto_examples").glob("plot_*.html"))
    assert len(pages) >= 4
    for page in pages:
        assert "sphx-glr-single-img" in page.read_text() or "sphx-glr-multi-img" in \
            page.read_text(), page.name


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        for key in ("href", "src"):
            if attrs.get(key) and not (tag == "link" and attrs.get("rel") == "preconnect"):
                self.links.append(attrs[key])


def test_no_broken_internal_links(site):
    pages = {}
    for path in site.rglob("*.html"):
        if path.relative_to(site).parts[0] == "_static":
            continue                                        # the theme's templates, not pages
        parser = _Links()
        parser.feed(path.read_text(encoding="utf-8"))
        pages[path.resolve()] = parser
    broken = []
    for path, parser in pages.items():
        for link in parser.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "javascript:")):
                continue                                    # external: not checked here
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{path.relative_to(site.resolve())}: {link}")
            elif parts.fragment and target.suffix == ".html":
                if target in pages and unquote(parts.fragment) not in pages[target].ids:
                    broken.append(f"{path.relative_to(site.resolve())}: {link} (no anchor)")
    assert not broken, "\n".join(broken[:50])
    assert len(pages) > 15
