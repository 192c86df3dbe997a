"""The colour policy: distinct, colour-blind-safe palettes, magenta only for OOD, stable colours."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from segscope.analysis.colours import (
    CELL_TYPE_COLOURS,
    CELL_TYPE_PALETTE,
    COMPARTMENT_COLOURS,
    EMBEDDED_COLOUR,
    LABEL_PALETTE,
    OOD_COLOUR,
    PENDING_COLOUR,
    cell_type_colour,
    hex_rgba,
)

#: Machado, Oliveira and Fernandes (2009), severity 1, on linear RGB.
DEUTERANOPIA = np.array(
    [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]]
)
PROTANOPIA = np.array(
    [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]]
)


def _linear(colour: str) -> np.ndarray:
    c = np.array(hex_rgba(colour)[:3], float) / 255
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _lab_of_linear(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of linear sRGB."""
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ rgb
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def lab(colour: str, vision: np.ndarray | None = None) -> np.ndarray:
    rgb = _linear(colour)
    if vision is not None:
        rgb = np.clip(vision @ rgb, 0, 1)
    return _lab_of_linear(rgb)


def delta_e(a: str, b: str, vision: np.ndarray | None = None) -> float:
    """CIE76 colour difference (a JND is about 2.3; 20+ tells categories apart at a glance)."""
    return float(np.linalg.norm(lab(a, vision) - lab(b, vision)))


def min_pairwise(colours, vision=None) -> float:
    return min(delta_e(a, b, vision) for a, b in itertools.combinations(colours, 2))


COMPARTMENTS = list(COMPARTMENT_COLOURS.values())
KNOWN_CELL_TYPES = list(CELL_TYPE_COLOURS.values())


def test_compartment_and_cell_type_palettes_are_disjoint_and_far_apart():
    assert not set(COMPARTMENTS) & set(CELL_TYPE_PALETTE)
    # Every compartment colour against every cell-type colour: never confusable.
    assert min(delta_e(a, b) for a in COMPARTMENTS for b in CELL_TYPE_PALETTE) >= 25
    everything = [*COMPARTMENTS, *CELL_TYPE_PALETTE, OOD_COLOUR, PENDING_COLOUR, EMBEDDED_COLOUR]
    assert len(set(everything)) == len(everything)
    assert min_pairwise(everything) >= 25


@pytest.mark.parametrize(
    ("vision", "name"), [(None, "normal"), (DEUTERANOPIA, "deuteranopia"), (PROTANOPIA, "protanopia")]
)
def test_compartments_and_known_cell_types_stay_distinct_for_colour_blind_eyes(vision, name):
    assert min_pairwise(COMPARTMENTS, vision) >= (50 if vision is None else 30), name
    assert min_pairwise(KNOWN_CELL_TYPES, vision) >= 25, name
    # The palette's later colours (for other names) are told apart by colour-blind eyes too,
    # if less easily.
    assert min_pairwise(CELL_TYPE_PALETTE, vision) >= (25 if vision is None else 12), name


def test_magenta_means_out_of_distribution_only_and_every_colour_shows_on_black():
    for colour in [*COMPARTMENTS, *CELL_TYPE_PALETTE, *LABEL_PALETTE, EMBEDDED_COLOUR, PENDING_COLOUR]:
        assert delta_e(colour, OOD_COLOUR) >= 70, colour
        assert lab(colour)[0] >= 45, colour  # L*: visible on the black 3-D view


def test_the_old_clashes_are_gone():
    # Soma and excitatory were both green; dendrite red sat next to astrocyte crimson.
    assert delta_e(COMPARTMENT_COLOURS["soma"], cell_type_colour("excitatory")) >= 40
    assert delta_e(COMPARTMENT_COLOURS["dendrite"], cell_type_colour("astrocyte")) >= 40
    assert delta_e(COMPARTMENT_COLOURS["glia"], cell_type_colour("astrocyte")) >= 25


def test_cell_type_colours_do_not_depend_on_class_order_or_a_loaded_classifier():
    demo = ("astrocyte", "excitatory", "inhibitory")
    for name in demo:
        colour = cell_type_colour(name)
        assert colour == cell_type_colour(name, demo) == cell_type_colour(name, demo[::-1]) == CELL_TYPE_COLOURS[name]
    assert cell_type_colour("Excitatory") == cell_type_colour("excitatory")
    assert len({cell_type_colour(name) for name in demo}) == 3
    # Other names: a hash of the name (pinned: the same every run), off the known types' colours.
    assert cell_type_colour("basket") == cell_type_colour("basket", ("pyramidal", "basket")) == "#0072b2"
    for name in (f"type {i}" for i in range(50)):
        assert cell_type_colour(name) in CELL_TYPE_PALETTE
        assert cell_type_colour(name) not in KNOWN_CELL_TYPES
    # With the classifier's classes, two of them never share a colour (up to the palette's size).
    classes = [f"type {i}" for i in range(len(CELL_TYPE_PALETTE) - len(KNOWN_CELL_TYPES))] + ["excitatory"]
    colours = [cell_type_colour(name, classes) for name in classes]
    assert len(set(colours)) == len(classes)
    assert colours == [cell_type_colour(name, classes[::-1]) for name in classes]


def test_the_plots_current_segment_outline_stands_apart_from_every_palette_colour():
    from segscope.analysis.colours import CURRENT_SEGMENT_OUTLINE

    palette = [*COMPARTMENTS, *KNOWN_CELL_TYPES, *CELL_TYPE_PALETTE, *LABEL_PALETTE, OOD_COLOUR]
    assert min(delta_e(CURRENT_SEGMENT_OUTLINE, colour) for colour in palette) > 15
