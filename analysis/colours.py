"""SegScope's colour policy, in one place.

What the 3-D view, the plot, the panels and the exported Neuroglancer layers show.
Hex sRGB strings (``"#rrggbb"``) for the views; uint8 RGBA for the plot's palettes. Magenta
is reserved for "out of distribution" everywhere, so no palette here contains it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

#: Display colour of each subcompartment (indexes ``analysis.COMPARTMENTS``), hex sRGB: four
#: of Okabe and Ito's colour-blind-safe colours (sky blue, vermillion, yellow, bluish green),
#: distinct in normal vision and under deuteranopia and protanopia simulation.
COMPARTMENT_COLOURS: dict[str, str] = {
    "axon": "#56b4e9",
    "dendrite": "#d55e00",
    "soma": "#f0e442",
    "glia": "#009e73",
}
#: Colour of a node whose embedding has not arrived yet.
PENDING_COLOUR = "#808080"
#: Colour of an embedded node when no subcompartment classifier is loaded (near white: no
#: compartment colour, and not the soma yellow).
EMBEDDED_COLOUR = "#f5f5f5"
#: Colour of an out-of-distribution segment in 3-D.
OOD_COLOUR = "#ff00ff"
#: The plot's outline of a selection made in the plot.
SELECTION_OUTLINE = "#ffffff"
#: The plot's outline of the segment chosen in 3-D, and its hover ring: cyan, at least
#: 17 CIE76 units from every palette colour (the yellow it replaced had come to mean soma).
CURRENT_SEGMENT_OUTLINE = "#00ffff"


#: Colours for cell types, disjoint from the compartment colours: light tints (violet,
#: pink, light green, olive, then orange, rose, lavender, blue) where the compartments are
#: saturated, so a segment's cell-type colour never reads as a node's compartment. The
#: first four are the known cell types' (:data:`CELL_TYPE_COLOURS`), distinct under
#: deuteranopia simulation too. No magenta: it means "out of distribution".
CELL_TYPE_PALETTE = (
    "#9988dd",
    "#ffaabb",
    "#b2df8a",
    "#999933",
    "#e69f00",
    "#ee6677",
    "#c5b0d5",
    "#0072b2",
)
#: Fixed colours of the usual cell types (names compared case-insensitively), so a
#: segment's colour never depends on which classifier (or none yet) is loaded, or on the
#: order its classes or the segments came in.
CELL_TYPE_COLOURS: dict[str, str] = {
    "excitatory": CELL_TYPE_PALETTE[0],
    "inhibitory": CELL_TYPE_PALETTE[1],
    "astrocyte": CELL_TYPE_PALETTE[2],
    "microglia": CELL_TYPE_PALETTE[3],
}

#: Colours of manual labels that are not compartment names, by position. Picked so that
#: every pair, and each against the compartment colours, magenta (OOD), the pending grey,
#: the embedded white, white and black, is at least 75 apart in RGB (0-255), and none is
#: too dark to see on the black 3-D view or the plot's dark background.
LABEL_PALETTE = (
    "#0077ff",
    "#bcf60c",
    "#fabebe",
    "#889900",
    "#44ff88",
    "#aaffc3",
    "#ffa500",
    "#00ff00",
    "#dc143c",
    "#e9967a",
    "#00ced1",
    "#2ca02c",
)


#: Plot colour of points with no known value (uint8 RGBA).
UNKNOWN_RGBA = (128, 128, 128, 200)
#: Distinct colours for categories (cell types, segments); with "unknown" at most 20
#: colours. No magenta: in the 3-D view it means out of distribution.
CATEGORY_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#637939",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#dbdb8d",
    "#9edae5",
    "#393b79",
)
#: Viridis anchors; OOD scores are binned into ``OOD_BINS`` colours interpolated between them.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)
OOD_BINS = 16


def hex_rgba(colour: str, alpha: int = 230) -> tuple[int, int, int, int]:
    """``"#rrggbb"`` as an RGBA tuple of 0-255 ints with ``alpha``."""
    colour = colour.lstrip("#")
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16), alpha


def hex_rgb01(colour: str) -> tuple[float, float, float]:
    """``"#rrggbb"`` as an RGB tuple of floats in [0, 1] (shaders), rounded to 3 decimals."""
    r, g, b, _ = hex_rgba(colour)
    return round(r / 255, 3), round(g / 255, 3), round(b / 255, 3)


def ood_bin_colours(n_bins: int = OOD_BINS) -> np.ndarray:
    """uint8 ``[n_bins, 4]`` RGBA of the OOD colour scale, low score first (viridis)."""
    t = np.linspace(0, 1, n_bins) * (len(_VIRIDIS) - 1)
    low = np.minimum(t.astype(int), len(_VIRIDIS) - 2)
    frac = (t - low)[:, None]
    rgb = _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac
    return np.concatenate([np.round(rgb), np.full((n_bins, 1), 230)], axis=1).astype(np.uint8)


def cell_type_colour(name: str, class_names: Sequence[str] = ()) -> str:
    """A stable display colour for a cell-type name.

    The usual cell types have fixed colours (:data:`CELL_TYPE_COLOURS`). Any other name
    takes the :data:`CELL_TYPE_PALETTE` colour an md5 of the name picks, among those no
    known cell type uses: the same every run, whatever the order classes or segments came
    in, and whether or not a classifier is loaded yet (a restored session shows the same
    colours before and after its classifiers load). With the classifier's ``class_names``,
    two of its classes that would share a colour are told apart: the later of them in name
    order moves to the next free colour (only then does ``class_names`` change a colour).
    """
    known = CELL_TYPE_COLOURS.get(name.lower())
    if known is not None:
        return known
    classes = sorted({str(c) for c in class_names} | {name})
    taken = {CELL_TYPE_COLOURS[c.lower()] for c in classes if c.lower() in CELL_TYPE_COLOURS}
    free = [c for c in CELL_TYPE_PALETTE if c not in CELL_TYPE_COLOURS.values()]
    chosen = ""
    for other in classes:
        if other.lower() in CELL_TYPE_COLOURS:
            continue
        start = hashlib.md5(other.encode("utf-8")).digest()[0] % len(free)
        # Probe the free colours, then the whole palette (more classes than colours).
        order = [free[(start + i) % len(free)] for i in range(len(free))] + list(CELL_TYPE_PALETTE)
        chosen = next((c for c in order if c not in taken), free[start])
        taken.add(chosen)
        if other == name:
            break
    return chosen


def label_colour(label: str, labels_in_order: Sequence[str] = ()) -> str:
    """The display colour (``"#rrggbb"``) of a manual label, in 3-D and in the plot alike.

    A label named like a subcompartment (``"axon"``...) takes that compartment's colour, so
    a manual "axon" looks like a predicted one. Other labels take the colours of
    :data:`LABEL_PALETTE` by their position among the non-compartment labels of
    ``labels_in_order`` (distinct for up to 12 such labels, then repeating); a label not in
    ``labels_in_order`` gets one picked by a hash of its text (stable across runs, but it may
    share a colour). Never magenta, which means out of distribution.

    Parameters
    ----------
    label
        The label text.
    labels_in_order
        Every label in use, in the order that assigns colours (the plot passes its sorted
        label names; pass the same list to both views so they agree).
    """
    if label in COMPARTMENT_COLOURS:
        return COMPARTMENT_COLOURS[label]
    others = [name for name in dict.fromkeys(labels_in_order) if name not in COMPARTMENT_COLOURS]
    return _palette_colour(label, others, LABEL_PALETTE)


def _palette_colour(name: str, ordered: list[str], palette: Sequence[str]) -> str:
    """``palette``'s colour for ``name``'s position in ``ordered`` (repeating past its end).

    A name not in ``ordered`` gets the colour an md5 of the name picks: the same every run.
    """
    if name in ordered:
        return palette[ordered.index(name) % len(palette)]
    digest = hashlib.md5(name.encode("utf-8")).digest()
    return palette[digest[0] % len(palette)]
