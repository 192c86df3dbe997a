"""The Open dialog (issue 12 item 6): fields, validation, recent sources, dropped folders,
and what the window opens from them, on the 96^3 demo (real precomputed volumes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PyQt6.QtWebEngineWidgets")  # before pytest-qt makes the QApplication

pytestmark = pytest.mark.qt

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(autouse=True)
def _own_recent_list(tmp_path, monkeypatch):
    """Each test starts with an empty recent-sources list in its own cache folder."""
    monkeypatch.setenv("SEGSCOPE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def store_dir(demo96_dir, tmp_path_factory) -> Path:
    """A CSV ZIP store (nm) with one demo segment's skeleton nodes."""
    from segscope.analysis.csvzip import CsvZipStore
    from segscope.analysis.dataset import open_dataset

    dataset = open_dataset(demo96_dir)
    segment_id = int(dataset.segment_ids[0])
    skeleton = dataset.skeleton(segment_id)
    folder = tmp_path_factory.mktemp("store")
    embeddings = np.random.default_rng(0).normal(size=(skeleton.n_nodes, 64)).astype(np.float32)
    CsvZipStore(folder, coordinates="nm").write_many(
        {segment_id: (np.arange(skeleton.n_nodes, dtype=np.int64), skeleton.nodes_nm, embeddings)}
    )
    return folder


def _drop(widget, folder: Path) -> None:
    """Deliver a real drag-enter and drop of ``folder`` (a file:// URL) to ``widget``."""
    from PyQt6.QtCore import QMimeData, QPoint, QPointF, Qt, QUrl
    from PyQt6.QtGui import QDragEnterEvent, QDropEvent
    from PyQt6.QtWidgets import QApplication

    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(folder))])
    enter = QDragEnterEvent(
        QPoint(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    )
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted(), "the folder drag was refused"
    drop = QDropEvent(
        QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    )
    QApplication.sendEvent(widget, drop)


@pytest.fixture
def window(qapp):
    from segscope.app.main import build_window

    win = build_window(None, None, plot=False)
    yield win
    win.dispose()


def test_missing_paths_are_shown_next_to_their_fields_and_nothing_is_accepted(qtbot, tmp_path, demo96_dir):
    from segscope.app.views.open_dialog import OpenDialog, OpenRequest, read_recent

    dialog = OpenDialog()
    qtbot.addWidget(dialog)
    (tmp_path / "not_classifiers").mkdir()
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    dialog.set_request(
        OpenRequest(
            image=str(demo96_dir / "image"),
            segmentation=str(tmp_path / "nowhere"),
            checkpoint=str(tmp_path / "broken.keras"),
            classifiers=str(tmp_path / "not_classifiers"),
        )
    )
    dialog.accept()
    assert dialog.result() != dialog.DialogCode.Accepted
    assert not dialog.errors["image"].isVisibleTo(dialog)
    assert "not found" in dialog.errors["segmentation"].text()
    assert "classifiers.json" in dialog.errors["classifiers"].text()
    assert dialog.errors["checkpoint"].text()  # check_checkpoint's own reason
    assert read_recent() == []  # only accepted requests are remembered

    dialog.set_request(OpenRequest(image=str(demo96_dir / "image"), segmentation=str(demo96_dir / "segmentation")))
    dialog.accept()
    assert dialog.result() == dialog.DialogCode.Accepted
    assert not any(label.text() for label in dialog.errors.values())


def test_a_dropped_dataset_or_volume_folder_fills_the_fields(qtbot, demo96_dir, tmp_path):
    from segscope.app.views.open_dialog import OpenDialog

    dialog = OpenDialog()
    qtbot.addWidget(dialog)
    _drop(dialog, demo96_dir / "segmentation")  # a precomputed folder: its info says segmentation
    request = dialog.request()
    assert request.segmentation == str(demo96_dir / "segmentation") and request.image == ""

    _drop(dialog, demo96_dir)  # a SegScope dataset: dataset.json names every part
    meta = json.loads((demo96_dir / "dataset.json").read_text())
    request = dialog.request()
    assert request.image == str(demo96_dir / meta["image"])
    assert request.segmentation == str(demo96_dir / meta["segmentation"])
    assert request.skeletons == str(demo96_dir / meta["skeletons"])

    empty = tmp_path / "holiday_photos"
    empty.mkdir()
    _drop(dialog, empty)
    assert "not a SegScope dataset" in dialog.errors["segmentation"].text()
    assert dialog.request() == request  # the fields are kept


def test_an_accepted_request_is_a_recent_entry_that_refills_every_field(qtbot, demo96_dir, store_dir):
    from segscope.app.views.open_dialog import OpenDialog, OpenRequest, read_recent

    first = OpenRequest(
        image=str(demo96_dir / "image"),
        segmentation=str(demo96_dir / "segmentation"),
        classifiers=str(ASSETS / "classifiers"),
        embeddings=str(store_dir),
    )
    dialog = OpenDialog(initial=first)
    qtbot.addWidget(dialog)
    dialog.accept()
    assert read_recent() == [first]

    later = OpenDialog()  # a new dialog reads the persisted list
    qtbot.addWidget(later)
    assert later.request() == OpenRequest()
    assert later.recent_combo.count() == 2
    later.recent_combo.activated.emit(1)
    assert later.request() == first


def test_the_window_opens_what_the_dialog_asks_for(qtbot, window, demo96_dir, store_dir):
    from segscope.app.views.open_dialog import OpenRequest

    request = OpenRequest(
        image=str(demo96_dir / "image"),
        segmentation=str(demo96_dir / "segmentation"),
        skeletons=str(demo96_dir / "segmentation" / "skeletons"),
        embeddings=str(store_dir),
    )
    window.open_request(request)
    qtbot.waitUntil(lambda: window.session.source is not None, timeout=30_000)
    source = window.session.source
    assert source.image_url.endswith("image") and source.segmentation_url.endswith("segmentation")
    assert window.session.precomputed is not None
    assert Path(window.session.precomputed.location).resolve() == store_dir.resolve()


def test_a_dataset_folder_dropped_on_the_window_opens_it(qtbot, window, demo96_dir):
    from segscope.app.views.open_dialog import read_recent

    _drop(window, demo96_dir)
    qtbot.waitUntil(lambda: window.session.source is not None, timeout=30_000)
    assert window.session.source.segmentation_url.endswith("segmentation")
    assert read_recent()[0].segmentation == str(demo96_dir / "segmentation")


@pytest.mark.slow
def test_checkpoint_and_classifiers_from_the_dialog_load_after_the_data(qtbot, window, demo96_dir):
    from segscope.app.views.open_dialog import OpenRequest

    window.open_request(
        OpenRequest(
            image=str(demo96_dir / "image"),
            segmentation=str(demo96_dir / "segmentation"),
            checkpoint=str(ASSETS / "demo_encoder.keras"),
            classifiers=str(ASSETS / "classifiers"),
        )
    )
    qtbot.waitUntil(lambda: window.state.model is not None and window.state.classifiers is not None, timeout=240_000)
    assert window.session.model_path == ASSETS / "demo_encoder.keras"


def test_a_parquet_embeddings_table_from_the_dialog_is_plotted_as_context(qtbot, qapp, demo96_dir):
    import pyarrow.parquet as pq

    from segscope.app.main import build_window
    from segscope.app.views.open_dialog import OpenDialog, OpenRequest

    table = ASSETS / "demo_context.parquet"
    request = OpenRequest(
        image=str(demo96_dir / "image"), segmentation=str(demo96_dir / "segmentation"), embeddings=str(table)
    )
    dialog = OpenDialog(initial=request)
    qtbot.addWidget(dialog)
    assert dialog.validate()  # a .parquet file is accepted where a store folder is
    window = build_window(
        None,
        None,
        # No UMAP: the context points stay on PCA (its numba compile would load a core for minutes).
        plot_options={"start_warm_up": False, "scheduler_options": {"min_points": 10**9, "warm_up": False}},
    )
    try:
        window.open_request(request)
        plot = window.session.plot
        qtbot.waitUntil(lambda: plot.n_points > 0, timeout=60_000)
        assert window.session.source is not None and window.session.precomputed is None
        assert plot.n_points == pq.ParquetFile(table).metadata.num_rows
    finally:
        window.dispose()


def test_file_open_from_the_menu_shows_the_dialog(qtbot, window):
    """The menu's File > Open (QAction.triggered passes checked=False) opens the dialog."""
    from PyQt6.QtCore import QTimer
    from PyQt6.QtWidgets import QApplication

    from segscope.app.views.open_dialog import OpenDialog

    shown = []

    def close_it():
        dialog = QApplication.activeModalWidget()
        shown.append(dialog)
        if dialog is not None:
            dialog.reject()

    QTimer.singleShot(500, close_it)
    window.open_action.trigger()  # modal: returns once close_it rejected it
    assert len(shown) == 1 and isinstance(shown[0], OpenDialog)
