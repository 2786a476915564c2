"""The studio in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium; `.ci/run` installs them), against a real uvicorn server on loopback.

Proves, as a musician would do it: open a MIDI file, drag over bars 3-4 (API bars 2..3) of the
bass on the grid, generate 2 candidates with progress, play one (the Web Audio context runs and
the synth schedules notes), accept it, undo and redo, download; the downloaded MIDI has new
notes in exactly the selected bars of the selected track and every other note unchanged. The
sampling fields and the decoding toggles start from the server's defaults (/v1/info), and the
request carries the toggles. The page logs no error. Skips (with the reason) where Chromium or Selenium is missing. With
MMM_STUDIO_SCREENSHOT=<png path> the screenshot (docs/_static/studio.png) is written there.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections import Counter

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")

from conftest import synthetic_score  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_helpers import serve_in_thread  # noqa: E402
from symusic import Score  # noqa: E402

from mmm.generation.request import SamplingConfig  # noqa: E402
from mmm.serve.app import Settings, create_app  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.subprocess]  # Chromium, and the server's worker processes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TRACK, FIRST, LAST = 1, 2, 3  # the bass, bars 2..3 on the model grid (3-4 as the page counts them)


@pytest.fixture
def browser(tmp_path):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("Chromium and its driver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # Selenium Manager downloads nothing when both paths are given
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def notes(track) -> Counter:
    return Counter((n.time, n.duration, n.pitch, n.velocity) for n in track.notes)


def test_studio_end_to_end(browser, serve_mmm, tmp_path, monkeypatch):  # noqa: F811
    import mmm.serve.server

    # Defaults other than SamplingConfig's own, in /v1/info only: the page must show the server's.
    monkeypatch.setattr(mmm.serve.server, "SamplingConfig", functools.partial(SamplingConfig, top_p=0.8))
    monkeypatch.setattr(mmm.serve.server, "DECODING_DEFAULTS", {"pitch_range": False, "monophonic": True})
    song = tmp_path / "song.mid"
    synthetic_score(seed=0, num_bars=8).dump_midi(song)
    original = Score(song)
    app = create_app(serve_mmm, Settings(), {"checkpoint": "random-weight test model"})
    with serve_in_thread(app) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        js = browser.execute_script
        wait.until(lambda d: js("return window.studio && window.studio.ready === true"))

        browser.find_element(By.ID, "file").send_keys(str(song))
        cell = lambda t, b: browser.find_element(By.CSS_SELECTOR, f"td.cell[data-track='{t}'][data-bar='{b}']")  # noqa: E731
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"td.cell[data-track='{TRACK}'][data-bar='{LAST}']"))
        assert (
            len(browser.find_elements(By.CSS_SELECTOR, "#grid tr")) == 1 + len(original.tracks) + 1
        )  # bars, tracks, add
        ActionChains(browser).click_and_hold(cell(TRACK, FIRST)).move_to_element(cell(TRACK, LAST)).release().perform()
        assert js("return window.studio.sel") == {"tracks": [TRACK], "a": FIRST, "b": LAST}
        assert "API: bars=[2,4]" in browser.find_element(By.ID, "selection").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "td.cell.selected")) == 2
        # the controls start from the piece's own values: the bass plays 4 notes a bar
        density = browser.find_element(By.CSS_SELECTOR, ".control[data-name='note_density'] input.value")
        assert density.get_attribute("value") == "4"
        # the sampling fields start from the server's defaults (/v1/info's "sampling")
        assert float(browser.find_element(By.ID, "top_p").get_attribute("value")) == 0.8
        assert float(browser.find_element(By.ID, "temperature").get_attribute("value")) == SamplingConfig.temperature
        # and so do the decoding constraints' toggles (/v1/info's "decoding")
        assert not browser.find_element(By.ID, "pitch_range").is_selected()
        assert browser.find_element(By.ID, "monophonic").get_attribute("value") == "true"

        browser.find_element(By.ID, "n").clear()
        browser.find_element(By.ID, "n").send_keys("2")
        browser.find_element(By.ID, "seed").send_keys("1")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "button.accept")) == 2)
        assert "2 candidate(s)" in browser.find_element(By.ID, "status").text
        (job,) = app.state.server.jobs.table.values()  # what the page sent, as the server read it
        assert job.result["request"]["pitch_range"] is False and job.result["request"]["monophonic"] is True

        browser.find_element(By.CSS_SELECTOR, "button.play-candidate").click()
        wait.until(lambda d: js("return window.studio.stats.notesScheduled") > 0)
        assert js("return window.studio.ctx.state") == "running"
        time.sleep(0.5)  # the playhead moves on
        js("window.scrollTo(0, 0)")
        shot = tmp_path / "studio.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("MMM_STUDIO_SCREENSHOT"):
            shutil.copy(shot, os.environ["MMM_STUDIO_SCREENSHOT"])
        browser.find_element(By.ID, "stop").click()
        assert js("return window.studio.player") is None

        browser.find_element(By.CSS_SELECTOR, "button.accept").click()
        wait.until(lambda d: js("return window.studio.history.length") == 1)
        accepted = js("return window.studio.piece.a.tracks[1].notes.length")
        browser.find_element(By.ID, "undo").click()
        assert js("return window.studio.piece.a.tracks[1].notes.length") == len(original.tracks[TRACK].notes)
        browser.find_element(By.ID, "redo").click()
        assert js("return window.studio.piece.a.tracks[1].notes.length") == accepted

        browser.find_element(By.ID, "download").click()
        wait.until(lambda d: [p for p in browser.downloads.iterdir() if p.suffix == ".mid"])
        time.sleep(0.2)
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []

    downloaded = Score(next(p for p in browser.downloads.iterdir() if p.suffix == ".mid"))
    assert downloaded.tpq == original.tpq and len(downloaded.tracks) == len(original.tracks)
    start, end = FIRST * 4 * original.tpq, (LAST + 1) * 4 * original.tpq
    for t, (before, after) in enumerate(zip(original.tracks, downloaded.tracks)):
        if t != TRACK:
            assert notes(after) == notes(before), f"track {t} changed"
    inside = lambda c: Counter({k: n for k, n in c.items() if start <= k[0] < end})  # noqa: E731
    outside = lambda c: Counter({k: n for k, n in c.items() if not start <= k[0] < end})  # noqa: E731
    before, after = notes(original.tracks[TRACK]), notes(downloaded.tracks[TRACK])
    assert outside(after) == outside(before)
    assert inside(after) and inside(after) != inside(before)  # new notes in the selected bars
