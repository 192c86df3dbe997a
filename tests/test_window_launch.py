"""The window at launch, offscreen: the idle job bar, the WebGL check and its banner, the
demo generated as a job in the window, the UMAP compile note (issue 16, items 1, 2, 10).

No GPU is needed: the WebGL detection is fed probe results and console messages; one test
runs the real probe in the real page and checks only that the window agrees with it.
"""

from __future__ import annotations

import logging
import threading

import pytest

# QtWebEngine must be imported before pytest-qt creates the QApplication.
pytest.importorskip("PyQt6.QtWebEngineWidgets")

pytestmark = pytest.mark.qt


@pytest.fixture
def window(qapp):
    from segscope.app.main import build_window
    from segscope.app.projection_process import LocalProjectionBackend

    # No data yet (as on a first launch), no model, no UMAP work, no child process.
    win = build_window(
        None,
        None,
        projection_backend=LocalProjectionBackend(),
        plot_options={"start_warm_up": False, "scheduler_options": {"min_points": 10**9, "warm_up": False}},
    )
    win.resize(1200, 800)
    win.show()
    yield win
    win.dispose()


def test_the_idle_job_bar_reads_no_job_without_a_count(window):
    bar = window.job_bar
    assert bar.name_label.text() == "No job"
    assert bar.progress.text() == ""  # it read "0 / 1"
    bar.show_task("Preparing the demo dataset", 3, 8)
    assert bar.progress.text() == "3 / 8"
    bar.show_job(None)
    assert bar.name_label.text() == "No job" and bar.progress.text() == ""


def test_a_probe_without_webgl_shows_why_and_how_to_fix_it(window):
    window.check_webgl_probe({"webgl2": True, "webgl": True, "message": ""})
    assert window.webgl_problem is None and not window.banner.isVisible()
    window.check_webgl_probe(None)  # the page was gone: says nothing
    assert window.webgl_problem is None

    window.check_webgl_probe({"webgl2": False, "webgl": False, "message": ""})
    text = window.banner.message
    assert window.banner.isVisible()
    assert "cannot draw" in text and "WebGL 2" in text
    assert "QTWEBENGINE_FORCE_USE_GBM=0" in text and "Known constraints" in text


def test_the_pages_own_webgl_error_is_shown(window):
    window.check_webgl_probe({"webgl2": True, "webgl": True, "message": "Error: WebGL not supported."})
    assert "WebGL not supported" in window.banner.message


def test_console_noise_goes_to_debug_and_a_webgl_failure_to_the_banner(window, caplog):
    from PyQt6.QtWebEngineCore import QWebEnginePage

    level = QWebEnginePage.JavaScriptConsoleMessageLevel
    with caplog.at_level(logging.DEBUG, logger="segscope.app.views.main_window"):
        window.page.javaScriptConsoleMessage(
            level.WarningMessageLevel, "[.WebGL-0x1]GL Driver Message: READ-usage buffer was written", 1, "x.js"
        )
    assert not window.banner.isVisible()
    assert any("READ-usage" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)

    window.page.javaScriptConsoleMessage(level.ErrorMessageLevel, "Uncaught Error: WebGL not supported.", 1, "main.js")
    assert window.banner.isVisible() and "Uncaught Error: WebGL not supported." in window.banner.message
    # Opening data hides other errors, not this one.
    first = window.banner.message
    window.report_webgl_problem("another")
    assert window.banner.message == first


def test_the_real_probe_runs_in_the_page(qtbot, window):
    from segscope.app.views.main_window import WEBGL_PROBE_JS, webgl_problem

    qtbot.waitUntil(lambda: window.page.url().toString().startswith("http"), timeout=30_000)
    results = []
    window.page.runJavaScript(WEBGL_PROBE_JS, 0, results.append)
    qtbot.waitUntil(lambda: bool(results), timeout=30_000)
    probe = results[0]
    print(f"WebGL probe offscreen: {probe}")
    assert isinstance(probe, dict) and {"webgl2", "webgl", "message"} <= set(probe)
    window.check_webgl_probe(probe)
    assert (window.webgl_problem is None) == (webgl_problem(probe) is None)


def test_the_demo_is_prepared_as_a_job_in_the_window(qtbot, window, monkeypatch, demo96_dir):
    import segscope.app.main as main
    from segscope.analysis.progress import Progress

    release = threading.Event()

    def fake_demo_job(seed=0, *, in_process=False):
        yield Progress(0, 8, "stages", "building the cells")
        yield Progress(2, 8, "stages", "painted neurites")
        release.wait(30)
        return demo96_dir

    monkeypatch.setattr(main, "demo_job", fake_demo_job)
    plan = main.LaunchPlan(None, None, True, demo_pending=True)
    then = []
    main.prepare_demo(window, plan, then=lambda: then.append(True))
    # The window is up and says what it is doing, with progress, while the demo is made.
    qtbot.waitUntil(lambda: "painted neurites" in window.job_bar.name_label.text(), timeout=10_000)
    assert "Preparing the demo dataset" in window.job_bar.name_label.text()
    assert window.job_bar.progress.text() == "2 / 8"
    assert window.state.dataset is None
    release.set()
    qtbot.waitUntil(lambda: window.state.dataset is not None, timeout=30_000)
    assert then == [True]
    assert window.job_bar.name_label.text() == "No job"


def test_a_cold_umap_compile_is_announced_under_the_plot(qtbot, window):
    from segscope.app.views.main_window import UMAP_COMPILE_NOTE

    scheduler = window.plot_dock.plot.scheduler
    window.watch_umap_compile(interval_ms=20)
    label = window.plot_dock.plot.status_label
    assert UMAP_COMPILE_NOTE in label.text()
    scheduler.warm_up_result = {"fit_s": 1.0}  # the warm-up finished
    qtbot.waitUntil(lambda: UMAP_COMPILE_NOTE not in label.text(), timeout=5_000)


def test_a_view_that_stays_black_is_reported(qtbot, window, monkeypatch):
    """WebGL may come up while the compositor shows nothing (Qt WebEngine's GBM path under
    Xvfb: every pixel black, the page's DOM included); the probe cannot see that, a grab can."""
    from PyQt6.QtGui import QColor, QImage, QPixmap

    from segscope.app.views.main_window import view_is_black

    black, grey = QImage(40, 30, QImage.Format.Format_ARGB32), QImage(40, 30, QImage.Format.Format_ARGB32)
    black.fill(QColor(0, 0, 0))
    grey.fill(QColor(0, 0, 0))
    grey.setPixelColor(5, 5, QColor(200, 200, 200))  # one drawn pixel: it draws
    assert view_is_black(black) and not view_is_black(grey) and not view_is_black(QImage())

    window.check_black_view(0)  # the real page, offscreen: drawn (or still white), not black
    assert window.webgl_problem is None

    monkeypatch.setattr(window.web_view, "grab", lambda *args: QPixmap.fromImage(black))
    window.check_black_view(1)  # black once: checked again before it says anything
    assert window.webgl_problem is None
    qtbot.waitUntil(lambda: window.webgl_problem is not None, timeout=10_000)
    text = window.banner.message
    assert "stayed black" in text and "QTWEBENGINE_FORCE_USE_GBM=0" in text
