"""The neighbor browser's page and the run report in a real headless Chromium (Debian's `chromium`,
installed by apt-get here when missing and the tests run as root) through Playwright, launched on that
executable (never `playwright install`: no download).

The run shown is a demo-like one (tests/demo_like_run.py: the demo's experiment, its stacked rule with
a gate, a few hundred images), or the finished run folder $RETFORMER_SCREENSHOT_RUN names (`make
docs-img RUN=work/runs/<demo run>`: README's pictures come from the demo). A passing test saves its
screenshot (browser.png, report.png) in its own folder, or in $RETFORMER_SCREENSHOT_DIR (`make
docs-img`: docs/img/). The run folder is only read: the report is built into the test's folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import FMNIST_DIR, have_fmnist
from tests.test_browse import Server, get_json

pytestmark = pytest.mark.system  # Debian's chromium (apt-get installed when missing) driven by Playwright

PAGE = 120  # thumbnails per page of the list (browse.html's PAGE)


def chromium_executable() -> str:
    """Debian's chromium, apt-get installed when missing (root only); a skip names why it cannot be."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found:
        return found
    if not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and there is no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip("chromium is not installed and the tests do not run as root: `apt-get install chromium`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:  # a stale package list: refresh it once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=1800)
    found = shutil.which("chromium")
    if proc.returncode != 0 or not found:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
        pytest.skip(f"`apt-get install chromium` failed (exit {proc.returncode}): {tail}")
    return found


@pytest.fixture(scope="module")
def shown_run(tmp_path_factory) -> Path:
    """The run folder the screenshots show: $RETFORMER_SCREENSHOT_RUN, else the demo-like run."""
    given = os.environ.get("RETFORMER_SCREENSHOT_RUN")
    if given:
        run = Path(given).resolve()
        if not (run / "eval.json").is_file():
            pytest.fail(f"RETFORMER_SCREENSHOT_RUN={given}: no finished run there (no eval.json)")
        return run
    if not have_fmnist():
        pytest.skip(f"Fashion-MNIST IDX files not in {FMNIST_DIR}")
    from tests.demo_like_run import build_demo_like

    return build_demo_like(tmp_path_factory.mktemp("demo_like"))


@pytest.fixture(scope="module")
def page_server(shown_run: Path):
    """`retformer browse <run folder>` in a subprocess on a free port; Ctrl+C must stop it with status 0."""
    srv = Server(str(shown_run), "--port", "0")
    try:
        srv.url()
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, "\n".join(srv.lines)


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium (Playwright on Debian's executable) for the module's tests."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (it is in the dev extra: .[dev])"
    )
    executable = chromium_executable()
    pw = sync_api.sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"], timeout=180_000)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        pw.stop()


def open_page(chromium, url: str, height: int = 860):
    """A new page at `url` whose script errors are collected in `page.errors`."""
    page = chromium.new_page(viewport={"width": 1280, "height": height})
    page.set_default_timeout(120_000)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(url)
    return page


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    """The page's screenshot as `name`: into $RETFORMER_SCREENSHOT_DIR when set (`make docs-img` sets it
    to docs/img/), else into the test's own folder: tests never write into the tracked tree. Written
    under a temporary name, then renamed."""
    folder = Path(os.environ.get("RETFORMER_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    tmp = target.with_name(f"{target.stem}.tmp-{os.getpid()}.png")
    page.screenshot(path=str(tmp))
    os.replace(tmp, target)
    return target


def pick(page, i: int) -> None:
    """Click list item i and wait until its detail is shown."""
    page.locator(f".q-item[data-i='{i}']").click()
    page.wait_for_selector(f"body[data-shown='{i}']")
    page.wait_for_function(
        "[...document.querySelectorAll('.nn-card img, .query img')]"
        ".every(img => img.complete && img.naturalWidth > 0)"
    )


def test_page_shows_neighbors_retrieval_use_and_the_effect_filter(page_server, chromium, tmp_path: Path):
    """In a real headless Chromium: the "wrong" filter leaves only wrongly predicted images; picking
    one renders its true class, the model's prediction beside the image-only one (L_I) with their
    correct / wrong badges, whether the rule used retrieval with the API's reason (s against the gate
    t), exactly k neighbor cards with decoded thumbnails, captions, similarities and one attention bar
    per stream whose weights are the API's and whose lengths are the weight over the stream's largest
    (that one full width); the "helped" filter leaves exactly the API's helped images. The screenshot
    (an image retrieval helped, where there is one) is saved when all hold."""
    url = page_server.url()
    run = get_json(url + "api/run")
    wrong = get_json(url + "api/queries?correct=false&limit=1000")
    helped = get_json(url + "api/queries?effect=helped&limit=1000")
    assert helped["total"] == run["effects"]["helped"] and wrong["total"] > 0
    page = open_page(chromium, url)
    page.wait_for_selector(".q-item")
    assert page.locator(".q-item").count() == min(run["num_samples"], PAGE)
    assert f"helped {run['effects']['helped']}" in page.inner_text("#run")
    page.select_option("#f-correct", "false")
    page.wait_for_function(
        f"document.querySelectorAll('.q-item').length === {min(wrong['total'], PAGE)} && "
        "!document.querySelector('.q-item.ok')"
    )
    assert page.inner_text("#count").startswith(f"{wrong['total']} image")
    first = wrong["items"][0]
    pick(page, first["i"])
    q = get_json(url + f"api/query/{first['i']}")
    detail = page.inner_text(".query")
    assert page.inner_text("#pred").startswith(q["pred_name"]) and q["label_name"] in detail
    assert page.inner_text("#image-pred").strip() == q["image_pred_name"]
    assert ("correct" if q["image_correct"] else "wrong") in page.inner_text("#image-pred + .badge")
    used = "used" if q["retrieval_used"] else "not used"
    assert page.inner_text("#retrieval") == f"{used} ({q['retrieval_reason']})"
    assert "null" not in page.inner_text("#detail") and "undefined" not in page.inner_text("#detail")
    cards = page.locator(".nn-card")
    assert cards.count() == run["k"] == len(q["neighbors"])
    streams = list(q["attention"])
    shares = page.evaluate(
        "[...document.querySelectorAll('.nn-card')].map(c => [...c.querySelectorAll('.bar')].map("
        "b => b.querySelector('.fill').getBoundingClientRect().width / "
        "b.querySelector('.track').getBoundingClientRect().width))"
    )
    for j, n in enumerate(q["neighbors"]):
        card = cards.nth(j)
        weights = json.loads(card.get_attribute("data-weights"))
        assert weights == {s: n["attention"][s][-1] for s in streams}
        assert f"sim {n['similarity']:.3f}" in card.inner_text()
        assert (n["caption"] or "(no caption)") in card.inner_text()
        for b, s in enumerate(streams):  # the bar's length: weight over the stream's largest weight
            top = max(m["attention"][s][-1] for m in q["neighbors"])
            assert shares[j][b] == pytest.approx(n["attention"][s][-1] / top, abs=0.01), (j, s)
    assert all(max(card[b] for card in shares) == pytest.approx(1, abs=0.01) for b in range(len(streams)))

    page.select_option("#f-correct", "")
    page.select_option("#f-effect", "helped")
    page.wait_for_function(
        f"document.querySelectorAll('.q-item').length === {min(helped['total'], PAGE)} && "
        "[...document.querySelectorAll('.q-item')].every(q => q.dataset.effect === 'helped')"
    )
    assert page.inner_text("#count").startswith(f"{helped['total']} image")
    shown = [int(i) for i in page.eval_on_selector_all(".q-item", "items => items.map(q => q.dataset.i)")]
    assert shown == [item["i"] for item in helped["items"][:PAGE]]
    if helped["items"]:
        pick(page, helped["items"][0]["i"])
        assert page.inner_text("#effect") == "retrieval helped"
    assert not page.errors, page.errors
    shot = save_screenshot(page, tmp_path, "browser.png")  # only a passing run saves its picture
    assert shot.stat().st_size > 10_000, shot


def test_report_renders_in_chromium_with_its_header_and_retrieval_section(
    shown_run, chromium, tmp_path: Path
):
    """The run's report.html (built now from its eval.json, into the test's folder) in the same
    Chromium: no script error, every inline figure decodes, the header names the encoders, the KB
    size, the index recall, the code commit and the browse command, the retrieval-quality section is
    there; the screenshot of its top is saved when all hold."""
    from retformer.pipelines.report import build_html

    report = json.loads((shown_run / "eval.json").read_text())
    html_file = tmp_path / "report.html"
    html_file.write_text(build_html(shown_run, report))
    page = open_page(chromium, html_file.as_uri(), height=1500)
    page.wait_for_function("[...document.images].every(img => img.complete && img.naturalWidth > 0)")
    assert page.locator("img").count() >= 3
    header = page.inner_text("table.header")
    for label in ("image encoder", "text encoder", "KB size", "index recall", "code commit", "browse"):
        assert label in header, label
    assert f"retformer browse '{shown_run.name}'" in header
    assert "Retrieval quality" in page.inner_text("body")
    assert not page.errors, page.errors
    shot = save_screenshot(page, tmp_path, "report.png")
    assert shot.stat().st_size > 10_000, shot
