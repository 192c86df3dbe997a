"""Neuroglancer segment properties and a viewer state that opens the exported layers.

Segment properties follow Neuroglancer's ``src/datasource/precomputed/segment_properties.md``
(``neuroglancer_segment_properties``, inline): a ``label`` shown beside each id, a
``description``, ``tags`` (cell type and ``ood``) and numeric properties.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segscope.analysis import COMPARTMENTS, colours
from segscope.analysis.colours import hex_rgb01
from segscope.analysis.export.atomic import atomic_folder
from segscope.analysis.export.model import SegmentTable

log = logging.getLogger(__name__)

#: Tag given to segments flagged out of distribution.
OOD_TAG = "ood"
#: Colours (RGB 0-1) of the compartments in the annotation shader: the app's
#: (:mod:`segscope.analysis.colours`), so an exported layer looks like the live one.
COMPARTMENT_COLOURS = {name: hex_rgb01(colour) for name, colour in colours.COMPARTMENT_COLOURS.items()}
#: Nodes with no prediction: the app's pending grey.
_UNPREDICTED_COLOUR = hex_rgb01(colours.PENDING_COLOUR)
#: Stands for a missing OOD score in numeric segment properties: JSON has no NaN, and scores
#: lie in [0, 1], so -1 cannot be mistaken for a score.
MISSING_SCORE = -1.0


def tag_name(text: str) -> str:
    """A Neuroglancer tag from a free-form name: no spaces, no leading ``#``."""
    tag = re.sub(r"\s+", "_", text.strip()).lstrip("#")
    return tag or "unnamed"


def _format_probability(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.2f}"


def segment_properties_json(segments: SegmentTable) -> dict:
    """The ``info`` JSON of a Neuroglancer inline segment-property map for ``segments``.

    - label: the manual label if any, else the cell type (``?`` appended when flagged OOD);
    - description: cell type with probability, OOD score, node counts, manual label;
    - tags: the cell type (spaces become ``_``) and ``ood`` when flagged;
    - numbers: ``p_<type>`` (float32; -1 where not predicted), ``ood_score`` (float32;
      -1 where none), ``n_nodes`` and ``n_<compartment>`` (uint32).
    """
    ids = [str(int(s)) for s in segments.segment_id]
    labels, descriptions = [], []
    for row in range(len(segments)):
        cell_type = segments.cell_type[row]
        manual = segments.manual_label[row]
        label = manual or cell_type
        if label and segments.ood[row]:
            label += "?"
        labels.append(label)
        parts = []
        if cell_type:
            if cell_type in segments.cell_type_names:
                p = segments.cell_type_probability[row, segments.cell_type_names.index(cell_type)]
                parts.append(f"cell type {cell_type} (p={_format_probability(p)})")
            else:
                parts.append(f"cell type {cell_type}")
        else:
            parts.append("cell type unknown")
        score = segments.ood_score[row]
        if np.isfinite(score):
            parts.append(f"OOD score {score:.3f}" + (" (flagged)" if segments.ood[row] else ""))
        elif segments.ood[row]:
            parts.append("flagged OOD")
        counts = segments.compartment_node_counts[row]
        parts.append(
            f"{int(counts.sum())} classified nodes ("
            + ", ".join(f"{name} {int(c)}" for name, c in zip(COMPARTMENTS, counts))
            + ")"
        )
        if manual:
            parts.append(f"manual label {manual}")
        descriptions.append("; ".join(parts))

    # Tags are matched case-insensitively, so names differing only in case share one tag.
    tags: list[str] = []
    tag_descriptions: list[str] = []
    tag_index: dict[str, int] = {}

    def tag_of(name: str, description: str) -> int:
        key = tag_name(name).lower()
        if key not in tag_index:
            tag_index[key] = len(tags)
            tags.append(tag_name(name))
            tag_descriptions.append(description)
        return tag_index[key]

    for name in segments.cell_type_names:
        tag_of(name, f"cell type {name}")
    tag_values = []
    for row in range(len(segments)):
        row_tags = set()
        if segments.cell_type[row]:
            row_tags.add(tag_of(segments.cell_type[row], f"cell type {segments.cell_type[row]}"))
        if segments.ood[row]:
            row_tags.add(tag_of(OOD_TAG, "flagged out of distribution"))
        tag_values.append(sorted(row_tags))

    def number(identifier: str, values: np.ndarray, data_type: str, description: str) -> dict:
        return {
            "id": identifier,
            "type": "number",
            "data_type": data_type,
            "description": description,
            "values": values.tolist(),
        }

    properties: list[dict] = [
        {"id": "label", "type": "label", "values": labels},
        {"id": "description", "type": "description", "values": descriptions},
        {"id": "tags", "type": "tags", "tags": tags, "tag_descriptions": tag_descriptions, "values": tag_values},
    ]
    for column, name in enumerate(segments.cell_type_names):
        p = segments.cell_type_probability[:, column].astype(np.float64)
        properties.append(
            number(
                f"p_{tag_name(name)}",
                np.where(np.isfinite(p), p, MISSING_SCORE),
                "float32",
                f"probability of cell type {name} (-1 = not predicted)",
            )
        )
    score = segments.ood_score.astype(np.float64)
    properties.append(
        number(
            "ood_score",
            np.where(np.isfinite(score), score, MISSING_SCORE),
            "float32",
            "out-of-distribution score (-1 = none)",
        )
    )
    counts = segments.compartment_node_counts
    properties.append(number("n_nodes", counts.sum(axis=1), "uint32", "classified skeleton nodes"))
    for code, name in enumerate(COMPARTMENTS):
        properties.append(number(f"n_{tag_name(name)}", counts[:, code], "uint32", f"nodes classified {name}"))
    return {"@type": "neuroglancer_segment_properties", "inline": {"ids": ids, "properties": properties}}


def write_segment_properties(path: str | Path, segments: SegmentTable, *, force: bool = False) -> dict:
    """Write ``segments`` as a Neuroglancer segment-property folder (``<path>/info``), atomically.

    Returns the JSON written.
    """
    info = segment_properties_json(segments)
    with atomic_folder(path, force=force) as folder:
        (folder / "info").write_text(json.dumps(info, allow_nan=False))
    log.info("wrote segment properties of %d segments to %s", len(segments), path)
    return info


def source_url(location: str | Path) -> str:
    """A ``precomputed://`` source for a URL or a local path.

    URLs with a scheme (``https://``, ``gs://``, ``s3://``, ``http://localhost:...``) are
    kept; a local path becomes a ``file://`` URI, which the neuroglancer Python package
    and TensorStore read but a web browser does not (serve the folder over HTTP and pass
    the URL instead). A ``precomputed://`` prefix already present is kept.
    """
    text = str(location)
    if text.startswith("precomputed://"):
        return text
    if "://" not in text:
        text = Path(text).resolve().as_uri()
    return f"precomputed://{text.rstrip('/')}"


def annotation_shader() -> str:
    """A Neuroglancer annotation shader colouring nodes by compartment."""
    lines = ["void main() {", "  int c = prop_compartment();", f"  vec3 colour = vec3{_UNPREDICTED_COLOUR};"]
    for code, name in enumerate(COMPARTMENTS):
        colour = COMPARTMENT_COLOURS.get(name, _UNPREDICTED_COLOUR)
        lines.append(f"  if (c == {code}) colour = vec3{tuple(colour)};  // {name}")
    lines += ["  setColor(colour);", "}"]
    return "\n".join(lines) + "\n"


def build_viewer_state(
    *,
    annotations: str | Path,
    image: str | Path | None = None,
    segmentation: str | Path | None = None,
    segment_properties: str | Path | None = None,
    voxel_size_nm: Sequence[float] | None = None,
    position_nm: Sequence[float] | None = None,
    selected_segments: Sequence[int] = (),
    layer_names: tuple[str, str, str] = ("image", "segmentation", "nodes"),
):
    """A ``neuroglancer.ViewerState`` opening image, segmentation and exported layers together.

    Parameters
    ----------
    annotations, image, segmentation, segment_properties
        URLs or local paths of the precomputed sources (see :func:`source_url`). The
        segment properties are attached to the segmentation layer as a second source; with
        no segmentation they form a segmentation layer of their own.
    voxel_size_nm
        x, y, z voxel size (nm): the viewer's global dimensions. Default: 1 nm.
    position_nm
        Initial position (nm), x, y, z.
    selected_segments
        Segment ids shown at start (and whose nodes the annotation layer shows).
    layer_names
        Names of the image, segmentation and annotation layers.
    """
    import neuroglancer

    image_name, segmentation_name, nodes_name = layer_names
    scales = np.asarray(voxel_size_nm if voxel_size_nm is not None else (1.0, 1.0, 1.0), dtype=np.float64)
    if scales.shape != (3,) or not (scales > 0).all():
        raise ValueError(f"voxel_size_nm must be 3 positive numbers, got {voxel_size_nm!r}")
    state = neuroglancer.ViewerState()
    state.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=scales.tolist())
    if position_nm is not None:
        position = np.asarray(position_nm, dtype=np.float64)
        if position.shape != (3,) or not np.isfinite(position).all():
            raise ValueError(f"position_nm must be 3 finite numbers, got {position_nm!r}")
        state.position = (position / scales).tolist()
    if image is not None:
        state.layers[image_name] = neuroglancer.ImageLayer(source=source_url(image))
    segmentation_sources = [source_url(s) for s in (segmentation, segment_properties) if s is not None]
    has_segmentation_layer = bool(segmentation_sources)
    if has_segmentation_layer:
        state.layers[segmentation_name] = neuroglancer.SegmentationLayer(
            source=segmentation_sources, segments=[int(s) for s in selected_segments]
        )
    annotation_layer = neuroglancer.AnnotationLayer(source=source_url(annotations), shader=annotation_shader())
    if has_segmentation_layer:
        annotation_layer.linked_segmentation_layer = {"segment": segmentation_name}
        annotation_layer.filter_by_segmentation = ["segment"]
    state.layers[nodes_name] = annotation_layer
    state.layout = "xy-3d"
    return state


def write_viewer_state(path: str | Path, state, *, force: bool = False) -> dict:
    """Write a viewer state as JSON (atomically). Returns the JSON dict."""
    from segscope.analysis.export.atomic import atomic_file

    state_json = state.to_json()
    with atomic_file(path, force=force) as temporary:
        temporary.write_text(json.dumps(state_json, indent=1))
    return state_json
