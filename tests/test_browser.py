"""The pages in a real browser: Debian's headless Chromium driven by Selenium through a real
uvicorn server, on the sample photos ingested with the default extractor.

Search by picking, dropping and clicking; the duplicates page following its background search
to the groups, then a changed keeper, resolved and undone; an index created from the collection
page with its progress. Screenshots go to
``test-artifacts/browser/`` (or ``$IMGSTORE_TEST_ARTIFACTS``) to be looked at. Without the
browser these tests fail in CI (``CI`` set) and skip, saying so, elsewhere; ``make test``
installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imgstore import ImageStore
from imgstore.samples import TRANSFORMS, write_samples
from imgstore.serve import Thumbnails, create_app

from .test_serve import running

ARTIFACTS = Path(os.environ.get("IMGSTORE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts")) / "browser"
#: The sample photos with five kinds of copy each (resized, recompressed, cropped, flipped, brighter).
COPIES = ("resize_half", "jpeg_q60", "crop_90", "flip", "brighter_20")


def _browser_binaries() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    found = _browser_binaries()
    if found is None:
        message = "Debian's chromium and chromium-driver are not installed (`make test` installs them)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run the browser tests")
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.set_page_load_timeout(120)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ImageStore, Path]]:
    folder = tmp_path_factory.mktemp("browser")
    photos = folder / "photos"
    write_samples(photos, {name: TRANSFORMS[name] for name in COPIES})
    store = ImageStore(f"sqlite:///{folder / 'store.db'}", cache_codes=True)
    store.ingest([photos])  # the default extractor; its automatic index
    app = create_app(store, thumbnails=Thumbnails(store, folder / "thumbs"), allow_writes=True, move_to=folder / "set-aside")
    app.state.photos = photos
    with running(app) as port:
        yield f"http://127.0.0.1:{port}", store, photos
    store.close()


def shot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def gone(element: Any, timeout_s: float = 60.0) -> None:
    """Wait until ``element``'s page has been replaced (after a click that submits a form): until
    then the old page's elements still match, and one read later is a stale reference."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            element.is_enabled()
        except StaleElementReferenceException:
            return
        time.sleep(0.1)
    raise AssertionError("the page was not replaced after the click")


def wait_for(driver: Any, css: str, timeout_s: float = 60.0) -> list[Any]:
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        if found:
            return list(found)
        time.sleep(0.1)
    shot(driver, "timeout")
    raise AssertionError(f"{css} did not appear on {driver.current_url}")


def wait_images(driver: Any) -> None:
    """Every <img> on the page has loaded (thumbnails are made on first request)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        if driver.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"):
            return
        driver.execute_script("document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
        time.sleep(0.2)
    raise AssertionError(f"images did not load on {driver.current_url}")


def groups_shown(driver: Any, timeout_s: float = 600.0) -> list[Any]:
    """The duplicate groups, once the page has followed its background search to them (the
    page replaces itself then; an element read from the page being replaced is stale)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if not driver.find_elements(By.ID, "dup-search"):
                groups = driver.find_elements(By.CSS_SELECTOR, "form.group")
                if groups and all(g.is_displayed() for g in groups):
                    return list(groups)
        except StaleElementReferenceException:
            pass
        time.sleep(0.2)
    shot(driver, "timeout")
    raise AssertionError(f"no duplicate groups on {driver.current_url}")


def card_names(driver: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.get_attribute("title") for e in driver.find_elements(By.CSS_SELECTOR, "#results .card .name")]


def test_search_by_pick_drop_and_click(browser: Any, site: tuple[str, ImageStore, Path]) -> None:
    from selenium.webdriver.common.by import By

    base, store, photos = site
    browser.get(base + "/")
    assert "Drop an image here" in browser.page_source
    shot(browser, "1-search-empty")
    browser.find_element(By.ID, "image-input").send_keys(str(photos / "originals" / "chelsea.png"))
    wait_for(browser, "#results .card")
    wait_images(browser)
    names = card_names(browser)
    assert len(names) == 20
    assert all("chelsea" in n for n in names[:6]), names[:8]  # the original and her five copies fill the top
    assert "Images like chelsea.png" in browser.page_source
    shot(browser, "2-search-chelsea")

    # drop a file on the page (the rocket photo, as a browser's drag and drop delivers it)
    rocket = store.image(str(photos / "originals" / "rocket.png")).id
    browser.execute_async_script("""
        const [url, done] = arguments;
        fetch(url).then(r => r.blob()).then(blob => {
          const dt = new DataTransfer();
          dt.items.add(new File([blob], 'dropped-rocket.jpg', {type: 'image/jpeg'}));
          document.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
          done(true);
        });""", f"/api/images/{rocket}/thumbnail?size=512")
    deadline = time.time() + 60
    while "dropped-rocket.jpg" not in browser.page_source and time.time() < deadline:
        time.sleep(0.2)
    assert "Images like dropped-rocket.jpg" in browser.page_source
    assert all("rocket" in n for n in card_names(browser)[:4])

    # click a result: search with that stored image
    clicked = browser.find_elements(By.CSS_SELECTOR, "#results .card a img")[1]
    clicked.click()
    gone(clicked)
    wait_for(browser, ".query h2 a")
    assert "stored image" in browser.find_element(By.CSS_SELECTOR, ".query").text
    assert all("rocket" in n for n in card_names(browser)[:4])
    # and its details page
    clicked = browser.find_elements(By.CSS_SELECTOR, "#results .card .name")[0]
    clicked.click()
    gone(clicked)
    wait_for(browser, ".facts h1")
    assert "current" in browser.find_element(By.CSS_SELECTOR, "ul.paths").text
    wait_images(browser)
    shot(browser, "3-image")


def test_duplicates_page_resolve_and_undo(browser: Any, site: tuple[str, ImageStore, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.webdriver.common.by import By

    base, store, photos = site
    # hold the search once it checks pairs, so the page is seen while it runs (whatever the speed)
    reached, gate = threading.Event(), threading.Event()
    real = store.find_duplicates

    def held(**options: Any) -> Any:
        progress = options.pop("progress")

        def report(phase: str, done: int, total: int) -> None:
            progress(phase, done, total)
            if phase == "checking" and done > 0 and not reached.is_set():
                reached.set()
                assert gate.wait(600)

        return real(progress=report, **options)

    monkeypatch.setattr(store, "find_duplicates", held)
    browser.get(base + "/duplicates")  # answered at once: the search runs in the background
    panel = wait_for(browser, "#dup-search")[0]
    assert "Finding duplicate groups" in panel.text and not browser.find_elements(By.CSS_SELECTOR, "form.group")
    assert reached.wait(600)
    state = panel.find_element(By.CSS_SELECTOR, ".state")
    deadline = time.time() + 60  # the page's script shows the progress it polls
    while not re.fullmatch(r"checking [\d,]+ of [\d,]+ candidate pairs", state.text) and time.time() < deadline:
        time.sleep(0.1)
    assert re.fullmatch(r"checking [\d,]+ of [\d,]+ candidate pairs", state.text), state.text
    shot(browser, "4-duplicates-searching")
    gate.set()
    groups = groups_shown(browser)  # the page turned itself into the groups, nobody reloaded it
    assert len(groups) >= 20  # most photos and their copies form one group each
    chelsea = next(g for g in groups if "chelsea" in g.text)
    members = chelsea.find_elements(By.CSS_SELECTOR, "label.member")
    assert len(members) == 6 and "suggested keeper" in members[0].text and "originals" in members[0].text
    wait_images(browser)
    shot(browser, "4-duplicates")
    # keep the flipped copy instead, then resolve the group
    flipped = next(m for m in members if "flip/" in m.text)
    flipped.click()
    assert flipped.find_element(By.CSS_SELECTOR, "input[type=radio]").is_selected()
    chelsea.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    gone(chelsea)
    # files moved: the groups are found again (the page follows that search), the note stays
    groups = groups_shown(browser)
    note = browser.find_element(By.CSS_SELECTOR, ".note")
    assert "Moved 5 files" in note.text, note.text
    assert (photos / "copies" / "flip" / "chelsea.jpg").exists() and not (photos / "originals" / "chelsea.png").exists()
    assert not any("chelsea" in g.text for g in groups)
    shot(browser, "5-resolved")
    browser.find_element(By.CSS_SELECTOR, ".note form.undo button").click()
    gone(note)  # the "Moved" note's page: a new note comes with the next page
    groups = groups_shown(browser)
    note = browser.find_element(By.CSS_SELECTOR, ".note")
    assert "Put back 5 files" in note.text
    assert (photos / "originals" / "chelsea.png").exists()
    assert any("chelsea" in g.text for g in groups)


def test_collection_page_creates_an_index(browser: Any, site: tuple[str, ImageStore, Path]) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, store, _ = site
    before = len(store.indexes())
    browser.get(base + "/collection")
    assert "efficientnet-lite0" in browser.page_source
    form = browser.find_element(By.ID, "create-index")
    Select(form.find_element(By.NAME, "method")).select_by_visible_text("lsh")
    form.find_element(By.CSS_SELECTOR, "button").click()
    wait_for(browser, "li.job")
    deadline = time.time() + 90  # the page follows the job and reloads when it is done
    while time.time() < deadline:
        try:
            rows = browser.find_elements(By.CSS_SELECTOR, "li.job")
            if rows and rows[0].get_attribute("data-state") == "done":
                break
        except StaleElementReferenceException:  # the page reloaded between the two reads
            pass
        time.sleep(0.3)
    wait_for(browser, 'li.job[data-state="done"]')
    assert len(store.indexes()) == before + 1
    active = browser.find_element(By.CSS_SELECTOR, "#indexes tr.active")
    assert "lsh" in active.text
    shot(browser, "6-collection")
