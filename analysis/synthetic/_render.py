"""EM-like appearance of a painted label volume.

Intensities (0 black, 255 white) mimic osmium-stained serial-section EM downsampled to
~32 nm: light extracellular space, mid-grey textured cytoplasm with a small random
brightness per cell (never per cell type), dark membranes on segment boundaries,
mitochondria as dark-walled bodies with mottled interiors, grainy vesicle clouds in
boutons, dark postsynaptic densities on spine heads, nuclei with a dark envelope,
peripheral heterochromatin and a nucleolus, lysosomes, glycogen granules in astrocytes;
then blur (stronger along z, the section axis), noise and section-to-section brightness
jitter. Organelles are drawn only inside the segment that owns them.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
from scipy import ndimage

from segscope.analysis.progress import Progress
from segscope.analysis.synthetic._morphology import ASTROCYTE, Cell
from segscope.analysis.synthetic._volume import Fragments, capsule_box, capsule_fields

CYTOPLASM = 162.0
EXTRACELLULAR = 200.0
MEMBRANE = 72.0


def boundary_mask(labels: np.ndarray) -> np.ndarray:
    """Voxels of a segment with a 6-neighbour of another label (or free space)."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)
        e = np.moveaxis(edge, axis, 0)
        diff = a[1:] != a[:-1]
        e[1:] |= diff
        e[:-1] |= diff
    return edge & (labels > 0)


def _smooth_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, truncate=2.5)
    field /= max(float(field.std()), 1e-6)
    return field


#: Codes of the organelle map ``render`` returns beside the image.
ORGANELLE_CODES = {"mito": 1, "vesicles": 2, "nucleus": 3, "lysosome": 4, "psd": 5, "glycogen": 6}


def render(
    labels: np.ndarray, cells: list[Cell], frags: Fragments, voxel_size_nm: np.ndarray, rng: np.random.Generator
) -> Generator[Progress, None, tuple[np.ndarray, np.ndarray]]:
    """Render an int32 label volume [x, y, z] (0 = extracellular) as EM.

    Returns the uint8 image [x, y, z] and a uint8 organelle map [x, y, z]
    (``ORGANELLE_CODES``, 0 = plain cytoplasm or extracellular space).
    """
    shape = labels.shape
    organelle = np.zeros(shape, dtype=np.uint8)
    steps = 5
    n_labels = int(labels.max()) + 1
    per_cell = rng.normal(0.0, 2.0, n_labels).astype(np.float32)
    per_cell[0] = 0.0
    texture = _smooth_noise(rng, shape, 1.3)
    inside = labels > 0
    img = np.where(inside, CYTOPLASM + per_cell[labels] + 7.0 * texture, EXTRACELLULAR + 5.0 * texture).astype(
        np.float32
    )
    del texture
    yield Progress(1, steps, "steps", "rendering cytoplasm")

    organelles = []
    for ci, cell in enumerate(cells):
        for org in cell.organelles:
            frag = frags.fragment[frags.node_offset[ci] + org.node]
            if frag >= 0:
                organelles.append((org, frag + 1))
    psds = []
    for org, host in organelles:
        r = org.radius_nm
        lo, hi = capsule_box(org.p0, org.p1, r, voxel_size_nm, np.array(shape))
        if np.any(hi <= lo):
            continue
        dist, _, t = capsule_fields(org.p0, org.p1, r, r, lo, hi, voxel_size_nm)
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        m = (labels[box] == host) & (dist < r)
        if not m.any():
            continue
        sub = img[box]
        organelle[box][m] = ORGANELLE_CODES[org.kind]
        d = np.broadcast_to(dist, m.shape)[m]
        n = int(m.sum())
        if org.kind == "mito":
            length = float(np.linalg.norm(org.p1 - org.p0))
            tt = np.broadcast_to(t, m.shape)[m]
            cristae = np.cos(2 * np.pi * tt * length / 110.0) * 9.0
            values = 116.0 + cristae + rng.normal(0, 10, n)
            values[d > r - 42.0] = 70.0
            sub[m] = values
        elif org.kind == "vesicles":
            dots = rng.random(n) < 0.5
            sub[m] -= np.where(dots, 75.0, 12.0)
        elif org.kind == "lysosome":
            values = 98.0 + rng.normal(0, 16, n)
            values[d > r - 45.0] = 60.0
            sub[m] = values
        elif org.kind == "nucleus":
            # Light euchromatin, clumps of dark heterochromatin under the envelope.
            values = 166.0 + rng.normal(0, 9, n)
            chromatin = (d > r - 240.0) & (rng.random(n) < 0.45)
            values[chromatin] = 118.0 + rng.normal(0, 8, int(chromatin.sum()))
            values[d > r - 62.0] = 76.0
            sub[m] = values
            c = org.p0 + (org.p1 - org.p0) * rng.random() + rng.normal(0, 0.25 * r, 3)
            _draw_sphere(img, labels, host, c, 0.26 * r, voxel_size_nm, 95.0, rng)
        elif org.kind == "psd":
            psds.append((box, m))
    yield Progress(2, steps, "steps", "rendering organelles")

    # Glycogen granules: sparse dark dots in astrocytic cytoplasm.
    types = np.array([c.cell_type for c in cells])
    is_astro = np.concatenate([[False], types[frags.fragment_cell] == ASTROCYTE])
    if n_labels > len(is_astro):
        raise ValueError("label volume holds more labels than there are fragments")
    astro = is_astro[labels]
    granules = astro & (rng.random(shape, dtype=np.float32) < 0.035)
    img[granules] -= 45.0
    organelle[granules] = ORGANELLE_CODES["glycogen"]
    del astro, granules

    edge = boundary_mask(labels)
    img[edge] = MEMBRANE + 6.0 * rng.standard_normal(int(edge.sum()), dtype=np.float32)
    del edge
    for box, m in psds:
        img[box][m] = 40.0
    yield Progress(3, steps, "steps", "rendering membranes")

    img += rng.standard_normal(shape, dtype=np.float32) * 12.0
    # Sections are thicker than the pixel size: more blur across z than within a section.
    img = ndimage.gaussian_filter(img, sigma=(0.75, 0.75, 0.95), truncate=2.5)
    yield Progress(4, steps, "steps", "blurring")
    img += rng.standard_normal(shape, dtype=np.float32) * 5.0
    img += rng.normal(0.0, 2.5, size=(shape[2],)).astype(np.float32)[None, None, :]
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    yield Progress(5, steps, "steps", "rendering done")
    return out, organelle


def _draw_sphere(img, labels, host, centre, r, voxel_size_nm, value, rng) -> None:
    lo, hi = capsule_box(centre, centre, r, voxel_size_nm, np.array(labels.shape))
    if np.any(hi <= lo):
        return
    dist, _, _ = capsule_fields(centre, centre, r, r, lo, hi, voxel_size_nm)
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    m = (labels[box] == host) & (dist < r)
    img[box][m] = value + rng.normal(0, 10, int(m.sum()))
