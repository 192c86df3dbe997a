"""SegScope's colour policy, in one place.

What the 3-D view, the plot, the panels and the exported Neuroglancer layers show.
Hex sRGB strings (``"#rrggbb"``) for the views; uint8 RGBA for the plot's palettes. Magenta
is reserved for "out of distribution" everywhere, so no palette here contains it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

#: Display colour of each subcompartment (indexes ``analysis.COMPARTMENTS``), hex sRGB.
COMPARTMENT_COLOURS: dict[str, str] = {
    "axon": "#3b8bff",
    "dendrite": "#ff5a36",
    "soma": "#2fd16b",
    "glia": "#c061ff",
}
#: Colour of a node whose embedding has not arrived yet.
PENDING_COLOUR = "#808080"
#: Colour of an embedded node when no subcompartment classifier is loaded.
EMBEDDED_COLOUR = "#ffe14d"
#: Colour of an out-of-distribution segment in 3-D.
OOD_COLOUR = "#ff00ff"


#: Colours for cell types (picked by a hash of the name, so stable across runs). No
#: magenta or violet: magenta means "out of distribution" and must stay unambiguous.
CELL_TYPE_PALETTE = (
    "#e6194b",
    "#3cb44b",
    "#ffe119",
    "#4363d8",
    "#f58231",
    "#46f0f0",
    "#bcf60c",
    "#fabebe",
    "#008080",
    "#9a6324",
    "#aaffc3",
    "#808000",
)

#: Colours of manual labels that are not compartment names, by position. Picked so that
#: every pair, and each against the compartment colours, magenta (OOD), the pending grey,
#: the embedded yellow, white and black, is at least 75 apart in RGB (0-255), and none is
#: too dark to see on the black 3-D view or the plot's dark background.
LABEL_PALETTE = (
    "#46f0f0",
    "#bcf60c",
    "#fabebe",
    "#008080",
    "#9a6324",
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

    With the classifier's ``class_names``, classes get distinct colours by their position
    (the palette has 12); otherwise a hash of the name picks one (same name, same colour,
    every run, but two names may share one).
    """
    return _palette_colour(name, list(class_names), CELL_TYPE_PALETTE)


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
