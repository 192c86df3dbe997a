"""The embedding plot's Qt-free logic: points, colours, hit tests, selections, no echo, scheduling."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from segscope.analysis.projection import UmapSettings
from segscope.app.plot_controller import (
    CATEGORY_COLOURS,
    COLOUR_MODES,
    OOD_BINS,
    PlotController,
    ProjectionScheduler,
)


def make_controller(n_segments: int = 4, per_segment: int = 25, dim: int = 8, seed: int = 0):
    """A controller with a grid-free random layout; segment s has ids 100 + s."""
    rng = np.random.default_rng(seed)
    controller = PlotController()
    for s in range(n_segments):
        nodes = np.arange(per_segment) * 3
        controller.add_points(
            100 + s, nodes, rng.uniform(0, 1000, (per_segment, 3)), rng.normal(size=(per_segment, dim))
        )
    controller.set_layout(None, rng.uniform(-10, 10, (controller.n_points, 2)), kind="pca")
    return controller


def test_add_points_appends_and_updates_existing_nodes():
    controller = PlotController()
    events = []
    controller.subscribe("points", events.append)
    rows = controller.add_points(5, [1, 2, 3], np.zeros((3, 3)), np.ones((3, 4)), compartments=[0, 1, 255])
    np.testing.assert_array_equal(rows, [0, 1, 2])
    # Node 2 again (new embedding) and node 9 (new): only node 9 is a new row.
    rows = controller.add_points(5, [2, 9], [[1, 1, 1], [2, 2, 2]], np.full((2, 4), 7.0))
    np.testing.assert_array_equal(rows, [3])
    assert controller.n_points == 4 and len(events) == 2
    np.testing.assert_array_equal(controller.embeddings[1], np.full(4, 7.0))
    np.testing.assert_array_equal(controller.rows_of(5, [9, 2, 4]), [3, 1, -1])
    assert controller.point(1).xyz_nm == (1.0, 1.0, 1.0) and controller.point(3).node_id == 9
    assert np.isnan(controller.layout).all()  # not placed until a projection places them
    with pytest.raises(ValueError, match="4-d"):
        controller.add_points(5, [10], np.zeros((1, 3)), np.zeros((1, 6)))
    with pytest.raises(ValueError, match="NaN"):
        controller.add_points(5, [10], np.zeros((1, 3)), np.full((1, 4), np.nan))
    with pytest.raises(IndexError):
        controller.point(4)


def test_colour_modes_give_shared_palettes():
    controller = make_controller()
    controller.set_compartments(100, [0, 3, 6], [0, 2, 3])
    controller.set_segment_labels(101, cell_type="pyramidal", ood_score=0.9)
    controller.set_segment_labels(102, cell_type="microglia", ood_score=0.1)
    rows_100 = controller.segment_rows([100])

    colours = controller.colours()  # subcompartment
    assert list(colours.index[rows_100[:4]]) == [0, 2, 3, 4] and colours.labels[4] == "unknown"

    controller.set_colour_mode("cell type")
    colours = controller.colours()
    assert colours.labels == ["pyramidal", "microglia", "unknown"]
    assert set(colours.index[controller.segment_rows([101])]) == {0}
    assert set(colours.index[controller.segment_rows([102])]) == {1}
    assert set(colours.index[controller.segment_rows([100, 103])]) == {2}

    # Colours follow the name, as in the 3-D view (segscope.analysis.colours), whether or not
    # the classifier's classes are known and whatever order the types came in.
    from segscope.analysis.colours import cell_type_colour, hex_rgba

    expected = [hex_rgba(cell_type_colour(name))[:3] for name in ("pyramidal", "microglia")]
    np.testing.assert_array_equal(controller.colours().palette[:2, :3], expected)
    controller.cell_type_class_names = ("microglia", "pyramidal")
    np.testing.assert_array_equal(controller.colours().palette[:2, :3], expected)

    controller.set_colour_mode("OOD score")
    colours = controller.colours()
    assert colours.value_range == pytest.approx((0.1, 0.9))
    assert set(colours.index[controller.segment_rows([101])]) == {OOD_BINS - 1}
    assert set(colours.index[controller.segment_rows([102])]) == {0}
    assert set(colours.index[controller.segment_rows([100])]) == {OOD_BINS}  # unknown
    assert len(colours.palette) == OOD_BINS + 1 <= 20

    controller.set_colour_mode("segment")
    colours = controller.colours()
    assert len(colours.palette) == len(CATEGORY_COLOURS) <= 20
    for segment in (100, 101, 102, 103):
        assert len(set(colours.index[controller.segment_rows([segment])])) == 1

    with pytest.raises(ValueError, match="colour mode"):
        controller.set_colour_mode("rainbow")
    assert set(COLOUR_MODES) == {"subcompartment", "cell type", "OOD score", "segment", "manual label"}


def test_manual_labels_come_from_the_lookup_and_colour_points():
    labels = {(100, 0): "bouton", (101, 3): "spine"}
    segment_labels = {102: "glia?"}

    def lookup(segments, nodes):
        return np.array(
            [labels.get((int(s), int(n)), segment_labels.get(int(s), "")) for s, n in zip(segments, nodes)],
            dtype=object,
        )

    controller = make_controller()
    controller.label_lookup = lookup
    events = []
    controller.subscribe("colours", lambda: events.append("colours"))
    controller.refresh_manual_labels()
    assert events == ["colours"]
    assert controller.manual_labels[controller.rows_of(100, [0])[0]] == "bouton"
    assert (controller.manual_labels[controller.segment_rows([102])] == "glia?").all()
    controller.refresh_manual_labels()  # nothing changed: no event
    assert events == ["colours"]

    controller.set_colour_mode("manual label")
    colours = controller.colours()
    assert colours.labels == ["bouton", "glia?", "spine", "unlabelled"]
    index = colours.index
    assert index[controller.rows_of(100, [0])[0]] == 0 and index[controller.rows_of(101, [3])[0]] == 2
    assert (index[controller.segment_rows([102])] == 1).all()
    assert (index[controller.segment_rows([103])] == 3).all()

    # Points arriving later ask the lookup: a labelled segment's new node shows its label.
    rows = controller.add_points(102, [999], np.zeros((1, 3)), np.zeros((1, 8)))
    assert controller.manual_labels[rows[0]] == "glia?"
    segment_labels.clear()
    controller.refresh_manual_labels()
    assert controller.manual_labels[rows[0]] == ""


def test_point_predictions_set_many_segments_at_once():
    controller = make_controller()
    rows = controller.segment_rows([100, 101])
    names = np.where(controller.segment_ids[rows] == 100, "basket", "")
    controller.set_point_predictions(rows, cell_types=names, ood_scores=np.linspace(0, 1, len(rows)))
    assert controller.cell_type_names == ["basket"]
    assert (controller.cell_type_codes[controller.segment_rows([100])] == 0).all()
    assert (controller.cell_type_codes[controller.segment_rows([101, 102])] == -1).all()
    assert controller.ood_scores[rows[-1]] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cell types"):
        controller.set_point_predictions(rows, cell_types=["x"])


def test_hit_test_returns_the_nearest_point_within_the_radius():
    controller = make_controller()
    rng = np.random.default_rng(5)
    for x, y in rng.uniform(-10, 10, (50, 2)):
        distances = np.linalg.norm(controller.layout - [x, y], axis=1)
        expected = int(distances.argmin())
        assert controller.hit_test(x, y, radius=100.0) == expected
        radius = float(distances.min()) * 0.9
        assert controller.hit_test(x, y, radius=radius) is None
    # Points that move (placements, a few rows at a time) are found where they are now,
    # and no longer where they were.
    controller.hit_test(0, 0, 1.0)  # builds the tree
    old = controller.layout[7].copy()
    controller.set_layout([7], [[50.0, 50.0]])
    assert controller.hit_test(50.1, 49.9, radius=1.0) == 7
    others = np.linalg.norm(controller.layout - old, axis=1)
    assert controller.hit_test(*old, radius=100.0) == int(others.argmin()) != 7
    # Many small moves, checked against brute force each time.
    for _ in range(30):
        rows = rng.choice(controller.n_points, 5, replace=False)
        controller.set_layout(rows, rng.uniform(-10, 10, (5, 2)))
        x, y = rng.uniform(-10, 10, 2)
        expected = int(np.linalg.norm(controller.layout - [x, y], axis=1).argmin())
        assert controller.hit_test(x, y, radius=100.0) == expected


def test_rectangle_and_lasso_select_the_points_inside():
    controller = PlotController()
    # Segment 1 on the left, segment 2 on the right, segment 3 far up.
    controller.add_points(1, [0, 1, 2], np.zeros((3, 3)), np.zeros((3, 4)))
    controller.add_points(2, [0, 1], np.zeros((2, 3)), np.zeros((2, 4)))
    controller.add_points(3, [5], np.zeros((1, 3)), np.zeros((1, 4)))
    controller.set_layout(None, [[0, 0], [1, 1], [0.5, 2], [5, 0], [6, 1], [0, 20]])
    np.testing.assert_array_equal(controller.rows_in_rectangle(1.5, -1, -1, 2.5), [0, 1, 2])
    np.testing.assert_array_equal(controller.rows_in_rectangle(4, -1, 7, 1.5), [3, 4])
    # An L around (0,0), (1,1) and (5,0) whose notch leaves out (6,1): concave shapes work.
    lasso = [[-1, -1], [6.5, -1], [6.5, 0.5], [1.5, 0.5], [1.5, 1.5], [-1, 1.5]]
    np.testing.assert_array_equal(controller.rows_in_polygon(lasso), [0, 1, 3])
    with pytest.raises(ValueError, match="lasso"):
        controller.rows_in_polygon([[0, 0], [1, 1]])

    received = []
    controller.subscribe("selection", received.append, name="3d")
    assert controller.select_rows(controller.rows_in_polygon(lasso), origin="plot")
    assert received[-1].segment_ids == frozenset({1, 2})
    np.testing.assert_array_equal(received[-1].node_ids, [0, 1, 0])
    assert received[-1].origin == "plot"


def test_lasso_matches_brute_force_on_random_points():
    controller = make_controller(n_segments=10, per_segment=100)
    angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    radii = 6 + 3 * np.sin(5 * angles)  # a star: concave
    star = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    inside = controller.rows_in_polygon(star)
    MplPath = pytest.importorskip("matplotlib.path").Path  # only to cross-check

    expected = np.flatnonzero(MplPath(star).contains_points(controller.layout))
    np.testing.assert_array_equal(inside, expected)


def test_external_selection_is_not_echoed_back():
    controller = make_controller()
    to_3d, to_view = [], []
    controller.subscribe("selection", to_3d.append, name="3d")
    controller.subscribe("selection", to_view.append)  # the plot view redraws every change

    assert controller.select_segments([101], origin="3d")
    assert to_3d == []  # the 3-D view made this selection: nothing goes back to it
    np.testing.assert_array_equal(to_view[-1].rows, controller.segment_rows([101]))
    # The same selection again (a round trip through neuroglancer) emits nothing at all.
    assert not controller.select_segments([101], origin="3d")
    assert len(to_view) == 1

    # A lasso in the plot goes to 3-D once, as segments...
    rows = controller.segment_rows([102])[:5]
    assert controller.select_rows(rows, origin="plot")
    assert to_3d[-1].segment_ids == frozenset({102}) and len(to_3d) == 1
    # ...and when 3-D reports those segments back, the plot keeps the 5 lassoed nodes.
    assert not controller.select_segments([102], origin="3d")
    np.testing.assert_array_equal(controller.selected_rows, rows)
    assert len(to_3d) == 1

    # Points of a segment selected in 3-D that stream in later join the selection,
    # and the change is still not sent back to 3-D.
    assert controller.select_segments([200], origin="3d")
    count = len(to_3d)
    new_rows = controller.add_points(200, [1, 2], np.zeros((2, 3)), np.zeros((2, 8)))
    np.testing.assert_array_equal(controller.selected_rows, new_rows)
    np.testing.assert_array_equal(to_view[-1].rows, new_rows)
    assert len(to_3d) == count


def test_hover_and_click_emit_the_node_for_3d_once_per_change():
    controller = make_controller()
    hovered, activated = [], []
    controller.subscribe("hover", hovered.append, name="3d")
    controller.subscribe("activate", activated.append)
    assert controller.hover(7)
    assert not controller.hover(7)
    assert controller.hover(None)
    assert [None if h is None else h.row for h in hovered] == [7, None]
    point = hovered[0]
    assert point.segment_id == int(controller.segment_ids[7]) and point.node_id == int(controller.node_ids[7])
    np.testing.assert_allclose(point.xyz_nm, controller.xyz_nm[7])
    controller.hover(3, origin="3d")  # the 3-D view's own hover is not sent back to it
    assert len(hovered) == 2
    info = controller.activate(9)
    assert activated == [info] and info.row == 9


class Pump:
    """A ``post`` for the scheduler that runs callbacks on the test thread, like Qt's queue."""

    def __init__(self):
        self.calls: queue.Queue = queue.Queue()

    def post(self, fn):
        self.calls.put(fn)

    def run_until(self, condition, timeout: float):
        import time

        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("condition not met")
            try:
                self.calls.get(timeout=min(remaining, 0.5))()
            except queue.Empty:
                pass


def test_hidden_segments_are_not_hit_selected_or_drawn_and_come_back_unchanged():
    controller = make_controller()
    visibility, selections = [], []
    controller.subscribe("visibility", visibility.append)
    controller.subscribe("selection", selections.append)
    layout_before = controller.layout.copy()
    rows_101 = controller.segment_rows([101])
    controller.select_segments([100, 101], origin="3d")
    selections.clear()

    assert controller.hide_segments([101, 999]) == 2  # 999 has no points yet: hidden when they come
    assert visibility == [frozenset({101, 999})]
    np.testing.assert_array_equal(np.flatnonzero(controller.hidden), rows_101)
    # The selection loses segment 101, as a change made in the plot (the 3-D view follows).
    assert selections[-1].segment_ids == frozenset({100}) and selections[-1].origin == "plot"
    assert not controller.selected[rows_101].any()
    # Not hit, not inside a rectangle, not selected from 3-D.
    x, y = controller.layout[rows_101[0]]
    hit = controller.hit_test(x, y, 1e-6)
    assert hit is None or controller.segment_ids[hit] != 101
    everything = controller.rows_in_rectangle(-100, -100, 100, 100)
    assert len(everything) == controller.n_points - len(rows_101)
    assert not np.isin(rows_101, everything).any()
    controller.select_segments([101], origin="3d")
    assert not controller.selected.any()
    controller.select_rows(np.concatenate([rows_101, [0]]), origin="session")  # e.g. a saved selection
    np.testing.assert_array_equal(controller.selected_rows, [0])
    # Still data: the layout and embeddings are untouched.
    np.testing.assert_array_equal(controller.layout, layout_before)
    # Context points of a hidden segment arrive hidden; a segment the user asks for again
    # (a session batch, not background) shows.
    rows_999 = controller.add_points(999, [1, 2], np.zeros((2, 3)), np.ones((2, 8)), background=True)
    assert controller.hidden[rows_999].all() and 999 in controller.hidden_segments
    controller.add_points(999, [3], np.zeros((1, 3)), np.ones((1, 8)))
    assert not controller.hidden[controller.segment_rows([999])].any()
    assert controller.hidden_segments == frozenset({101})

    assert controller.show_segments() == 1
    assert not controller.hidden.any() and visibility[-1] == frozenset()
    assert controller.hit_test(x, y, 1e-6) == rows_101[0]
    assert controller.hide_segments([]) == 0 and controller.show_segments() == 0
    controller.clear()
    assert controller.hidden_segments == frozenset() and len(controller.hidden) == 0


def test_scheduler_shows_pca_at_once_as_points_arrive():
    controller = PlotController()
    scheduler = ProjectionScheduler(controller, Pump().post, min_points=10**9, warm_up=False)
    layouts = []
    controller.subscribe("layout", layouts.append)
    rng = np.random.default_rng(0)
    try:
        for batch in range(6):
            controller.add_points(
                1, np.arange(batch * 16, batch * 16 + 16), np.zeros((16, 3)), rng.normal(size=(16, 8))
            )
            assert np.isfinite(controller.layout).all()  # placed synchronously, no waiting
        assert controller.layout_kind == "pca" and not any(change.animate for change in layouts)
        # The PCA is refitted only when the data has doubled: batches 1, 2, 4 refit all rows.
        assert [change.rows is None for change in layouts] == [True, True, False, True, False, False]
        assert scheduler.umap is None and not scheduler.busy
    finally:
        scheduler.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_scheduler_fits_umap_in_the_background_then_places_new_points():
    """Pays numba's compile cost with a cold cache: slow."""
    pump = Pump()
    controller = PlotController()
    scheduler = ProjectionScheduler(
        controller,
        pump.post,
        settings=UmapSettings(n_epochs=50, seed=0),
        min_points=200,
        refit_growth=100.0,
        warm_up=True,
    )
    layouts = []
    controller.subscribe("layout", layouts.append)
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 8, size=(3, 16))
    labels = rng.integers(0, 3, 400)
    points = (centres[labels] + rng.normal(size=(400, 16))).astype(np.float32)
    try:
        scheduler.start()
        controller.add_points(1, np.arange(300), np.zeros((300, 3)), points[:300])
        assert controller.layout_kind == "pca"  # shown at once
        pump.run_until(lambda: controller.layout_kind == "umap", timeout=600)
        assert any(change.animate and change.kind == "umap" for change in layouts)
        controller.add_points(1, np.arange(300, 400), np.zeros((100, 3)), points[300:])
        pump.run_until(lambda: not scheduler.busy and np.isfinite(controller.layout).all(), timeout=300)
        layout = controller.layout
        centroids = np.stack([layout[:300][labels[:300] == c].mean(axis=0) for c in range(3)])
        nearest = np.linalg.norm(layout[300:, None] - centroids[None], axis=2).argmin(axis=1)
        assert (nearest == labels[300:]).mean() > 0.95
        assert scheduler.umap.n_points == 300  # placed by transform, not refitted
    finally:
        scheduler.shutdown()


def test_clear_drops_points_and_the_scheduler_forgets_its_models():
    controller = make_controller()
    scheduler = ProjectionScheduler(controller, warm_up=False, min_points=10**9)
    controller.add_points(200, [1, 2, 3], np.zeros((3, 3)), np.ones((3, 8)))
    assert scheduler.pca is not None
    controller.select_segments([100], origin="3d")
    events = []
    controller.subscribe("cleared", lambda: events.append("cleared"))
    controller.clear()
    assert events == ["cleared"] and controller.n_points == 0 and controller.embeddings.shape == (0, 0)
    assert len(controller.selected_rows) == 0 and controller.segment_rows([100]).size == 0
    assert scheduler.pca is None and scheduler.umap is None and scheduler.status == "PCA"
    # New data of another width starts afresh, placed by a new PCA.
    controller.add_points(7, [1, 2, 3], np.zeros((3, 3)), np.random.default_rng(0).normal(size=(3, 5)))
    assert controller.embeddings.shape == (3, 5) and np.isfinite(controller.layout).all()
    scheduler.shutdown()


def test_legend_counts_classes_and_a_hidden_class_is_not_drawn_hit_or_selected():
    controller = make_controller()  # 4 segments of 25 points, compartments unknown
    controller.set_compartments(100, np.arange(25) * 3, np.zeros(25, np.uint8))  # segment 100: axon (code 0)
    controller.set_compartments(101, np.arange(10) * 3, np.full(10, 1, np.uint8))
    legend = {entry.label: entry for entry in controller.legend()}
    from segscope.analysis import COMPARTMENTS

    first, second = COMPARTMENTS[0], COMPARTMENTS[1]
    assert legend[first].count == 25 and legend[second].count == 10 and legend["unknown"].count == 65
    assert sum(entry.count for entry in legend.values()) == controller.n_points
    assert not any(entry.hidden for entry in legend.values())
    np.testing.assert_array_equal(controller.legend_rows(first), controller.segment_rows([100]))

    visibility, selections = [], []
    controller.subscribe("visibility", visibility.append)
    controller.subscribe("selection", selections.append)
    controller.select_segments([100, 101], origin="3d")
    assert controller.toggle_class(first) is True  # hidden now
    assert controller.hidden_classes == frozenset({first}) and len(visibility) == 1
    rows = controller.segment_rows([100])
    assert controller.hidden[rows].all() and controller.hidden.sum() == 25
    # Out of the selection (a plot change: 3-D follows), not hit, not in a rectangle.
    assert selections[-1].origin == "plot" and selections[-1].segment_ids == frozenset({101})
    assert not controller.selected[rows].any() and controller.selected[controller.segment_rows([101])].all()
    x, y = controller.layout[rows[0]]
    hit = controller.hit_test(x, y, 1e-6)
    assert hit is None or controller.segment_ids[hit] != 100
    assert not np.isin(rows, controller.rows_in_rectangle(-100, -100, 100, 100)).any()
    legend = {entry.label: entry for entry in controller.legend()}
    assert legend[first].hidden and legend[first].count == 25  # a hidden class still says how many

    # Points that change class follow: segment 101's other nodes become axon, so they hide.
    controller.set_compartments(101, [30, 33], [0, 0])
    assert controller.hidden[controller.rows_of(101, [30, 33])].all()
    # Another colour mode shows every class; coming back hides them again.
    controller.set_colour_mode("segment")
    assert not controller.hidden.any() and controller.legend() == []
    with pytest.raises(ValueError, match="no legend"):
        controller.set_class_hidden("segment")
    controller.set_colour_mode("subcompartment")
    assert controller.hidden.sum() == 27
    # Hidden segments and hidden classes combine; showing one keeps the other.
    controller.hide_segments([102])
    assert controller.hidden.sum() == 52
    assert controller.show_classes() == 1
    np.testing.assert_array_equal(np.flatnonzero(controller.hidden), controller.segment_rows([102]))
    assert controller.legend()[0].count == 27  # the hidden segment's points are not counted
    assert controller.toggle_class(first) is True and controller.toggle_class(first) is False
    # New points of a hidden class arrive hidden.
    controller.set_class_hidden("unknown")
    new = controller.add_points(200, [1, 2], np.zeros((2, 3)), np.ones((2, 8)))
    assert controller.hidden[new].all()


def test_hides_can_be_undone_last_first():
    controller = make_controller()
    controller.select_segments([100, 101], origin="plot")
    assert controller.hide_selection() == (2, 50)
    assert controller.can_undo_hide
    controller.hide_segments([102])
    controller.select_segments([103], origin="plot")
    assert controller.hide_selection() == (1, 25)
    assert controller.undo_hide() == (1, 25) and controller.hidden_segments == frozenset({100, 101, 102})
    controller.show_segments([102])  # shown by hand: its hide has nothing left to undo
    assert controller.undo_hide() == (2, 50) and controller.hidden_segments == frozenset()
    assert not controller.can_undo_hide and controller.undo_hide() == (0, 0)
    # A hide restored from a saved session is not an undoable step.
    controller.hide_segments([101], undoable=False)
    assert not controller.can_undo_hide
    controller.clear()
    assert not controller.can_undo_hide


def test_describe_point_and_selection_for_tooltips_and_counts():
    controller = make_controller()
    controller.label_lookup = lambda segments, nodes: np.where(segments == 101, "bouton", "").astype(object)
    controller.refresh_manual_labels()
    controller.set_compartments(101, [0], [1])
    controller.set_segment_labels(101, cell_type="pyramidal", ood_score=0.25)
    row = int(controller.rows_of(101, [0])[0])
    from segscope.analysis import COMPARTMENTS

    text = controller.describe_point(row)
    assert text.splitlines() == [
        "segment 101 · node 0",
        f"compartment: {COMPARTMENTS[1]}",
        "cell type: pyramidal",
        "OOD score: 0.250",
        "manual label: bouton",
    ]
    other = controller.describe_point(int(controller.segment_rows([100])[0]))
    assert "cell type: unknown" in other and "OOD score: unknown" in other and "manual label: none" in other
    assert controller.describe_selection() == ""
    controller.select_rows(controller.segment_rows([100, 101])[:26], origin="plot")
    assert controller.describe_selection() == "26 points of 2 segments selected"
    controller.select_rows([0], origin="plot")
    assert controller.describe_selection() == "1 point of 1 segment selected"
