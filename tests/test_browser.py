"""The pages in a real browser: Debian's headless Chromium driven by Selenium through a real
uvicorn server, on the sample photos ingested with the default extractor.

Search by picking, dropping and clicking; the duplicates page following its background search
to the groups, then a changed keeper, resolved and undone; an index created from the collection
page with its progress; a search by words; the collection browsed, filtered by a label, and an
image page's labels leading back to it. Screenshots go to
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

from .helpers import missing_tool
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
        missing_tool("Debian's chromium and chromium-driver are not installed (`make test` installs them)",
                     "the browser tests")
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
    # the script marks the row done, then reloads the page: wait for the reloaded one (whenever it comes)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            active = browser.find_elements(By.CSS_SELECTOR, "#indexes tr.active")
            if active and "lsh" in active[0].text:
                break
        except StaleElementReferenceException:
            pass
        time.sleep(0.2)
    assert "lsh" in browser.find_element(By.CSS_SELECTOR, "#indexes tr.active").text
    shot(browser, "6-collection")


def test_find_by_words(browser: Any, site: tuple[str, ImageStore, Path]) -> None:
    """Type words, press Enter: the hits as cards and what the words were understood as."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, _, _ = site
    browser.get(base + "/")
    box = browser.find_element(By.ID, "words")
    box.send_keys("a cat" + Keys.ENTER)  # Enter in the box: its own button, the form's first
    gone(box)
    understood = wait_for(browser, "#understood")[0]
    assert "understood as" in understood.text and "Images matching “a cat”" in understood.text
    wait_images(browser)
    names = card_names(browser)
    assert len(names) == 20 and "chelsea" in names[0], names[:6]
    assert sum("chelsea" in n for n in names[:6]) >= 5, names[:6]  # the cat and her copies
    assert browser.find_element(By.ID, "words").get_attribute("value") == "a cat"
    # each card shows the match score that orders the results (never rising down the grid) and
    # its best-matching label as words, with no class probability beside it
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    matches = [card.find_element(By.CSS_SELECTOR, ".match").text for card in cards]
    assert all(re.fullmatch(r"match [\d.e-]+", m) for m in matches), matches
    values = [float(m.split()[1]) for m in matches]
    assert values == sorted(values, reverse=True), matches
    labels = [e.text for card in cards[:6] for e in card.find_elements(By.CSS_SELECTOR, ".label")]
    assert labels and all(labels) and not any("%" in label for label in labels), labels
    assert "cat" in labels[0], labels  # chelsea, a tabby (or tiger or Egyptian cat)
    assert "best match first" in understood.text
    shot(browser, "7-words")


def test_browse_the_collection_by_label(browser: Any, site: tuple[str, ImageStore, Path]) -> None:
    """The collection page: thumbnails in even rows, a pager, the common labels; a label
    filters the page; a thumbnail opens its image page, whose labels lead back here."""
    from imgstore import SearchFilter
    from selenium.webdriver.common.by import By

    base, store, _ = site
    browser.get(base + "/collection?per_page=30&sort=folder&order=asc")
    tiles = wait_for(browser, "#browse .tile")
    total = store.browse().total
    assert len(tiles) == min(30, total) and total > 30
    wait_images(browser)
    pictures = browser.find_elements(By.CSS_SELECTOR, "#browse .tile img")
    sizes = {(p.rect["width"], p.rect["height"]) for p in pictures}
    assert len(sizes) == 1, sizes  # every thumbnail the same square, whatever the photo's shape
    rows: dict[float, int] = {}
    for p in pictures:
        rows[p.rect["y"]] = rows.get(p.rect["y"], 0) + 1
    assert len(rows) == -(-len(pictures) // max(rows.values())), rows  # full rows, then the rest
    pager = browser.find_element(By.ID, "pager")
    assert pager.is_displayed() and f"page 1 of {-(-total // 30)}" in pager.text
    shot(browser, "8-collection")
    browser.execute_script("arguments[0].scrollIntoView({block: 'end'})", pager)
    shot(browser, "8-collection-pager")

    chip = browser.find_elements(By.CSS_SELECTOR, "#labels a.chip")[0]
    name = " ".join(chip.text.split()[:-1])  # "golden retriever" and its count
    chip.click()
    gone(chip)
    tiles = wait_for(browser, "#browse .tile")
    shown = {int(t.find_element(By.CSS_SELECTOR, "a").get_attribute("href").rsplit("/", 1)[1]) for t in tiles}
    assert shown == {i.image_id for i in store.browse(SearchFilter(labels=name), sort="folder", order="asc", per_page=30).items}
    assert browser.find_element(By.CSS_SELECTOR, "#labels a.chip.on").text.startswith(name)
    assert browser.find_element(By.NAME, "label").get_attribute("value") == name.casefold()
    wait_images(browser)
    shot(browser, "9-collection-label")

    picture = tiles[0].find_element(By.CSS_SELECTOR, "a img")
    picture.click()
    gone(picture)
    wait_for(browser, ".facts h1")
    labels = browser.find_element(By.CSS_SELECTOR, "ul.labels")
    assert name in labels.text and "%" in labels.text
    wait_images(browser)
    shot(browser, "10-image-labels")
    link = labels.find_element(By.LINK_TEXT, name)
    link.click()
    gone(link)
    assert wait_for(browser, "#labels a.chip.on")[0].text.startswith(name)
