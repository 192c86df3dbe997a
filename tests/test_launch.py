"""Launch planning on the console side (no Qt): sessions on the command line, context."""

from __future__ import annotations

import argparse

import pytest

from segscope.app.main import LaunchError, add_open_arguments, plan_launch


def parse(*argv: str) -> argparse.Namespace:
    return add_open_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_a_dataset_folder_is_checked_for_context_and_a_mismatch_says_why(demo96_dir):
    plan = plan_launch(parse("--image", str(demo96_dir / "image"), "--segmentation", str(demo96_dir / "segmentation")))
    assert plan.source.segmentation_url.endswith("segmentation")
    # The shipped context describes the 256^3 demo, not this 96^3 one: no context, and why.
    assert plan.background is None and "size_vox" in plan.background_note


def test_the_batch_size_reaches_the_plan_and_a_bad_one_is_refused(demo96_dir, capsys):
    folders = ("--image", str(demo96_dir / "image"), "--segmentation", str(demo96_dir / "segmentation"))
    assert plan_launch(parse(*folders)).batch_size is None  # the engine's default
    assert plan_launch(parse(*folders, "--batch-size", "4")).batch_size == 4
    with pytest.raises(SystemExit):
        parse(*folders, "--batch-size", "0")
    assert "--batch-size" in capsys.readouterr().err


def test_a_saved_session_names_the_data_and_the_command_line_wins(demo96_dir, tmp_path):
    from segscope.app.session_file import DatasetRef, SessionDocument, save_session

    dataset = DatasetRef("demo96", str(demo96_dir / "image"), str(demo96_dir / "segmentation"), None)
    path = save_session(tmp_path / "s.segscope.json", SessionDocument(dataset=dataset))
    plan = plan_launch(parse("--session", str(path)))
    assert plan.session == path and plan.source.segmentation_url == str(demo96_dir / "segmentation")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LaunchError, match="--classifiers"):  # an option given wins over the session's
        plan_launch(parse("--session", str(path), "--classifiers", str(tmp_path / "empty")))
    gone = save_session(
        tmp_path / "gone.segscope.json", SessionDocument(dataset=dataset, model_path=str(tmp_path / "missing.keras"))
    )
    with pytest.raises(LaunchError, match=r"missing\.keras"):  # the session's own model is checked
        plan_launch(parse("--session", str(gone)))


def test_a_missing_or_broken_session_is_a_launch_error(tmp_path):
    with pytest.raises(LaunchError, match="no session file"):
        plan_launch(parse("--session", str(tmp_path / "none.segscope.json")))
    bad = tmp_path / "bad.segscope.json"
    bad.write_text("{not json")
    with pytest.raises(LaunchError, match=r"bad\.segscope\.json"):
        plan_launch(parse("--session", str(bad)))


# -- a first launch: the window first, the demo as a job (issue 16, item 2) ----------------------


def test_a_first_launch_plans_the_demo_without_generating_it(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    started = time.perf_counter()
    plan = plan_launch(parse(), defer_demo=True)
    seconds = time.perf_counter() - started
    print(f"plan_launch on a cold cache: {seconds:.2f} s")
    assert plan.demo_pending and plan.source is None and plan.background is None
    assert not list((tmp_path / "cache").glob("demo/*/dataset.json"))  # nothing generated
    assert seconds < 10.0  # generating took ~20 s before the window


def test_a_cached_demo_is_opened_at_once(tmp_path, monkeypatch, demo96_dir):
    import shutil

    from segscope.analysis.synthetic import GENERATOR_VERSION

    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(demo96_dir, tmp_path / "cache" / "demo" / f"v{GENERATOR_VERSION}-seed0")
    plan = plan_launch(parse(), defer_demo=True)
    assert not plan.demo_pending and plan.source is not None


def _fake_demo_dataset(folder, fail=False):
    """Stands in for demo_dataset: its progress reports (5 stages, 3 parts, nested steps)."""
    from segscope.analysis.progress import Progress

    def demo_dataset(seed=0, progress=None):
        for i in range(1, 6):
            progress(Progress(i, 5, "stages", f"stage {i}"))
            if i == 4:
                progress(Progress(1, 2, "steps", "rendering cytoplasm"))
        if fail:
            raise OSError("disk full")
        for i in range(1, 4):
            progress(Progress(i, 3, "parts", f"part {i}"))
        return folder

    return demo_dataset


def test_the_demo_job_reports_progress_over_all_stages(tmp_path, monkeypatch):
    import segscope.analysis.synthetic as synthetic
    from segscope.app.main import demo_job

    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "demo_dataset", _fake_demo_dataset(tmp_path / "demo"))
    job = demo_job(in_process=True)
    reports = []
    try:
        while True:
            reports.append(next(job))
    except StopIteration as stop:
        folder = stop.value
    assert folder == tmp_path / "demo"
    done = [report.done for report in reports]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 8
    assert {report.total for report in reports} == {8}
    assert "rendering cytoplasm" in [report.message for report in reports]


def test_a_failed_demo_generation_fails_the_job(tmp_path, monkeypatch):
    import segscope.analysis.synthetic as synthetic
    from segscope.app.main import demo_job

    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "demo_dataset", _fake_demo_dataset(tmp_path / "demo", fail=True))
    with pytest.raises(RuntimeError, match="OSError: disk full"):
        list(demo_job(in_process=True))


# -- Qt WebEngine's environment (issue 16, items 1 and 9) ---------------------------------------


def test_qt_environment_defaults_apply_only_where_the_user_set_nothing(monkeypatch):
    import os

    from segscope.app.main import configure_qt_environment

    names = ("QTWEBENGINE_FORCE_USE_GBM", "QTWEBENGINE_CHROMIUM_FLAGS", "QT_LOGGING_RULES", "SEGSCOPE_VERBOSE")
    for name in (*names, "QTWEBENGINE_DISABLE_SANDBOX"):
        monkeypatch.delenv(name, raising=False)
    configure_qt_environment()
    assert os.environ["QTWEBENGINE_FORCE_USE_GBM"] == "0"  # Xvfb and VMs: a black view otherwise
    flags = os.environ["QTWEBENGINE_CHROMIUM_FLAGS"].split()
    assert "--ignore-gpu-blocklist" in flags and "--log-level=3" in flags

    monkeypatch.setenv("QTWEBENGINE_FORCE_USE_GBM", "1")
    monkeypatch.setenv("QTWEBENGINE_CHROMIUM_FLAGS", "--enable-logging")
    configure_qt_environment()
    assert os.environ["QTWEBENGINE_FORCE_USE_GBM"] == "1"
    assert os.environ["QTWEBENGINE_CHROMIUM_FLAGS"] == "--enable-logging"

    monkeypatch.delenv("QTWEBENGINE_CHROMIUM_FLAGS")
    monkeypatch.setenv("SEGSCOPE_VERBOSE", "1")  # segscope -v: Chromium logs as it likes
    configure_qt_environment()
    assert "--log-level" not in os.environ["QTWEBENGINE_CHROMIUM_FLAGS"]
