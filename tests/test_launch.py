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
