"""The demo's context embeddings: provenance matching, prediction columns, and the embed CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from segscope.analysis import COMPARTMENTS
from segscope.analysis.projection import read_embedding_table
from segscope.analysis.provenance import (
    DEMO_CONTEXT_NAME,
    PROVENANCE_KEY,
    classifier_hashes,
    find_demo_context,
    read_provenance,
)

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "assets" / DEMO_CONTEXT_NAME
ENCODER = REPO / "assets" / "demo_encoder.keras"
CLASSIFIERS = REPO / "assets" / "classifiers"


def write_demo_metadata(folder: Path, **changes) -> Path:
    """``dataset.json`` as the default demo dataset (seed 0) writes it, with ``changes``."""
    from segscope.analysis.dataset import write_dataset_metadata
    from segscope.analysis.synthetic import CELL_TYPES, DEFAULT_SIZE_VOX, DEFAULT_VOXEL_SIZE_NM, GENERATOR_VERSION

    params = dict(
        name="segscope-demo",
        size_vox=DEFAULT_SIZE_VOX,
        voxel_size_nm=DEFAULT_VOXEL_SIZE_NM,
        cell_types=CELL_TYPES,
        seed=0,
        generator_version=GENERATOR_VERSION,
    )
    params.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    write_dataset_metadata(folder, **params)
    return folder


# -- provenance matching -----------------------------------------------------------------------


def test_committed_asset_fits_the_default_demo_and_shipped_models(tmp_path):
    found = find_demo_context(write_demo_metadata(tmp_path / "demo"))
    assert found, f"{found.reason}: rebuild it with scripts/build_demo_assets.sh --context-only"
    assert found.path == ASSET and found.reason == ""
    record = read_provenance(ASSET)
    assert record["dataset"]["seed"] == 0 and record["classifiers"]["files"] == classifier_hashes(CLASSIFIERS)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"seed": 1}, "seed 0"),
        ({"generator_version": 3}, "generator_version"),
        ({"size_vox": (128, 128, 128)}, "size_vox"),
        ({"name": "my-volume", "seed": None, "generator_version": None}, "name"),
    ],
)
def test_other_demo_parameters_are_rejected_with_the_reason(tmp_path, caplog, changes, words):
    caplog.set_level("INFO", logger="segscope.analysis.provenance")
    found = find_demo_context(write_demo_metadata(tmp_path / "other", **changes))
    assert not found and found.path is None
    assert words in found.reason and words in caplog.text


def test_other_encoder_or_classifiers_are_rejected_but_no_classifiers_is_fine(tmp_path):
    dataset = write_demo_metadata(tmp_path / "demo")
    other_encoder = tmp_path / "encoder.keras"
    other_encoder.write_bytes(ENCODER.read_bytes() + b"\0")
    found = find_demo_context(dataset, encoder_path=other_encoder)
    assert not found and "another encoder" in found.reason
    other = tmp_path / "classifiers"
    shutil.copytree(CLASSIFIERS, other)
    manifest = json.loads((other / "classifiers.json").read_text())
    manifest["cell_type"]["radius_nm"] = 5000.0
    (other / "classifiers.json").write_text(json.dumps(manifest))
    found = find_demo_context(dataset, classifiers_folder=other)
    assert not found and "other classifiers" in found.reason
    # Without classifiers the labels are not used, so only data and encoder must match.
    assert find_demo_context(dataset, classifiers_folder=None).path == ASSET
    assert "no encoder" in find_demo_context(dataset, encoder_path=None).reason


def test_missing_dataset_or_context_file_gives_a_reason_not_an_error(tmp_path):
    assert "no dataset.json" in find_demo_context(tmp_path / "nothing").reason
    dataset = write_demo_metadata(tmp_path / "demo")
    found = find_demo_context(dataset, context_path=tmp_path / "gone.parquet")
    assert not found and "not found" in found.reason
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    assert "not a readable Parquet" in find_demo_context(dataset, context_path=tmp_path / "junk.parquet").reason


# -- prediction columns ------------------------------------------------------------------------


def _write_table(path: Path, *, predictions: bool, n: int = 6, dim: int = 3) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    embeddings = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    columns = {
        "segment_id": pa.array([5, 5, 5, 9, 9, 9], pa.uint64()),
        "node_id": pa.array(range(n), pa.int64()),
        "x_nm": np.arange(n, dtype=np.float64),
        "y_nm": np.zeros(n),
        "z_nm": np.full(n, 40.0),
    }
    columns.update({f"e{d}": embeddings[:, d] for d in range(dim)})
    if predictions:
        columns["compartment"] = pa.array(["axon", "glia", None, "soma", "cilium", "dendrite"]).dictionary_encode()
        columns["compartment_probability"] = pa.array([0.9, 0.8, None, 0.7, 0.6, 0.5], pa.float32())
        columns["cell_type"] = pa.array(["excitatory"] * 3 + [None] * 3).dictionary_encode()
        columns["cell_type_probability"] = pa.array([0.7] * 3 + [None] * 3, pa.float32())
        columns["ood_score"] = pa.array([0.2] * 3 + [None, np.nan, None], pa.float32())
    pq.write_table(pa.table(columns), path, compression="zstd")
    return embeddings


def test_read_embedding_table_fills_prediction_fields(tmp_path):
    embeddings = _write_table(tmp_path / "labelled.parquet", predictions=True)
    table = read_embedding_table(tmp_path / "labelled.parquet")
    np.testing.assert_array_equal(table.embeddings, embeddings)
    assert table.compartments.dtype == np.uint8
    # Unknown names ("cilium") and nulls are 255, the plot's "unknown".
    assert table.compartments.tolist() == [0, 3, 255, 2, 255, 1]
    assert table.cell_types.dtype == object and table.cell_types.tolist() == ["excitatory"] * 3 + [""] * 3
    assert table.ood_scores.dtype == np.float32
    np.testing.assert_allclose(table.ood_scores[:3], 0.2)
    assert np.isnan(table.ood_scores[3:]).all()
    subset = read_embedding_table(tmp_path / "labelled.parquet", max_rows=4)
    assert len(subset.compartments) == len(subset.cell_types) == len(subset.ood_scores) == 4
    np.testing.assert_array_equal(subset.compartments, table.compartments[subset.node_ids])


def test_read_embedding_table_reads_old_files_without_predictions(tmp_path):
    _write_table(tmp_path / "old.parquet", predictions=False)
    table = read_embedding_table(tmp_path / "old.parquet")
    assert len(table) == 6 and table.embeddings.shape == (6, 3)
    assert table.compartments is None and table.cell_types is None and table.ood_scores is None


def test_read_embedding_table_names_missing_columns_and_bad_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"segment_id": pa.array([1], pa.uint64()), "node_id": [0], "x_nm": [0.0], "y_nm": [0.0], "e0": [1.0]}),
        tmp_path / "noz.parquet",
    )
    with pytest.raises(KeyError, match=r"noz\.parquet.*z_nm"):
        read_embedding_table(tmp_path / "noz.parquet")
    (tmp_path / "junk.parquet").write_text("segment_id,node_id\n")
    with pytest.raises(ValueError, match=r"junk\.parquet"):
        read_embedding_table(tmp_path / "junk.parquet")


# -- segscope embed --segments all --classifiers -----------------------------------------------


@pytest.mark.slow  # 18-26 s on the shared 2-core machine, most of it TensorFlow's start-up
def test_embed_all_segments_with_classifiers_writes_the_apps_predictions(tmp_path, capsys):
    """The shipped encoder and classifiers on a small demo: every segment, its nodes labelled
    exactly as the app labels them while streaming, and provenance that find_demo_context
    accepts for that dataset."""
    from segscope.app.cli import main

    demo = tmp_path / "demo"
    assert main(["demo-data", "--out", str(demo), "--size", "88", "--seed", "3"]) == 0
    out = tmp_path / "context.parquet"
    assert (
        main(
            [
                "embed",
                "--image",
                str(demo / "image"),
                "--segmentation",
                f"file://{demo / 'segmentation'}",
                "--segments",
                "all",
                "--checkpoint",
                str(ENCODER),
                "--classifiers",
                str(CLASSIFIERS),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    import pyarrow.parquet as pq

    from segscope.analysis.dataset import open_dataset

    dataset = open_dataset(demo)
    raw = pq.read_table(out)
    assert {"compartment", "compartment_probability", "cell_type", "cell_type_probability", "ood_score"} <= set(
        raw.column_names
    )
    assert raw.schema.field("e0").type == "float" and PROVENANCE_KEY in raw.schema.metadata
    from segscope.analysis.inference import resolve_precision

    # --precision defaults to auto; the file says what it resolved to on this machine.
    assert json.loads(raw.schema.metadata[PROVENANCE_KEY])["precision"] == resolve_precision("auto")
    table = read_embedding_table(out)
    assert set(table.segment_ids.tolist()) == set(dataset.segment_ids.tolist())
    assert (table.compartments < len(COMPARTMENTS)).all()
    probability = raw.column("compartment_probability").to_numpy()
    assert ((probability > 0) & (probability <= 1)).all()
    manifest = json.loads((CLASSIFIERS / "classifiers.json").read_text())
    assert set(table.cell_types.tolist()) <= set(manifest["cell_type"]["classes"])
    assert np.isfinite(table.ood_scores).all()
    for segment in np.unique(table.segment_ids):  # one call per segment, repeated on its rows
        rows = table.segment_ids == segment
        assert len(set(table.cell_types[rows].tolist())) == 1 and len(set(table.ood_scores[rows].tolist())) == 1

    # The app streams a segment's nodes in small batches; its last word on each node must be
    # what the file says.
    from segscope.analysis.artefacts import read_classifier_folder
    from segscope.analysis.classify.segments import load_segment_predictor

    summary = read_classifier_folder(CLASSIFIERS)
    predictor, _ = load_segment_predictor(
        [{"task": i.task, "path": i.path, "radius_nm": i.radius_nm} for i in (summary.compartment, summary.cell_type)]
    )
    biggest = max(np.unique(table.segment_ids), key=lambda s: int((table.segment_ids == s).sum()))
    rows = np.flatnonzero(table.segment_ids == biggest)
    assert len(rows) >= 4
    predictor.start(table.xyz_nm[rows])
    codes = np.full(len(rows), 255, np.uint8)
    for start in range(0, len(rows), 2):
        batch = np.arange(start, min(start + 2, len(rows)))
        predictions = predictor.add(batch, table.embeddings[rows[batch]])
        codes[predictions.compartments.indices] = predictions.compartments.codes
    np.testing.assert_array_equal(codes, table.compartments[rows])
    assert predictions.cell_type.name == table.cell_types[rows[0]]
    np.testing.assert_allclose(predictions.cell_type.ood_score, table.ood_scores[rows[0]], rtol=1e-5)

    assert find_demo_context(demo, context_path=out, encoder_path=ENCODER, classifiers_folder=CLASSIFIERS)
    assert (
        main(
            [
                "embed",
                "--image",
                str(demo / "image"),
                "--segmentation",
                str(demo / "segmentation"),
                "--segments",
                "all",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--segments", "all", "--out", "{tmp}/e.parquet"], "no segment with at least 1 voxels"),
        (["--segments", "7", "--classifiers", str(CLASSIFIERS), "--out", "{tmp}/store"], "only a .parquet"),
        (["--segments", "7", "--classifiers", "{tmp}/none", "--out", "{tmp}/e.parquet"], "no classifier folder"),
    ],
)
def test_embed_bad_arguments_give_one_line_errors(tmp_path, capsys, argv, message):
    from segscope.analysis.volume import write_volume
    from segscope.app.cli import main

    write_volume(tmp_path / "img", np.zeros((20, 20, 20), np.uint8), (32, 32, 40))
    write_volume(tmp_path / "seg", np.zeros((20, 20, 20), np.uint64), (32, 32, 40), segmentation=True)
    argv = [
        "embed",
        "--image",
        str(tmp_path / "img"),
        "--segmentation",
        str(tmp_path / "seg"),
        *[a.replace("{tmp}", str(tmp_path)) for a in argv],
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar
    assert err.startswith("segscope embed: error:") and message in err


def test_model_sha256_hashes_exactly_one_checkpoints_files(tmp_path):
    from segscope.analysis.provenance import model_sha256

    for name, data in (
        ("ckpt-1.index", b"a"),
        ("ckpt-1.data-00000-of-00001", b"b"),
        ("ckpt-10.index", b"other"),
        ("ckpt-10.data-00000-of-00001", b"other"),
    ):
        (tmp_path / name).write_bytes(data)
    first = model_sha256(tmp_path / "ckpt-1")
    (tmp_path / "ckpt-10.index").write_bytes(b"changed")  # another checkpoint changes...
    assert model_sha256(tmp_path / "ckpt-1") == first  # ...this one's hash does not
    (tmp_path / "ckpt-1.index").write_bytes(b"changed")
    assert model_sha256(tmp_path / "ckpt-1") != first
    with pytest.raises(FileNotFoundError, match="ckpt-2"):
        model_sha256(tmp_path / "ckpt-2")
