"""Cell morphologies of the synthetic neuropil: skeleton trees with radii, in nm.

Every cell is a tree of nodes (parent index < child index) with a radius, a subcompartment
and a node kind per node, plus organelles attached to nodes. Nothing here touches voxels:
``_volume`` paints these trees and ``_render`` draws the organelles.

The morphologies follow what distinguishes the cell classes in cortical EM:

* excitatory: spiny dendrites (thin necks, round heads carrying a postsynaptic density),
  thin axons with small, sparse en-passant boutons full of vesicles, pyramidal somata with
  a thick tapering apical dendrite;
* inhibitory: thicker smooth dendrites rich in mitochondria, thicker axons with large,
  frequent boutons that each hold a mitochondrion, round somata;
* astrocyte: thin, densely and irregularly branching processes (the volume painter later
  lets them flood the leftover gaps between neurites, which makes them sheet-like);
* microglia (the held-out outlier): few thick, tortuous processes that end in bulbous tips,
  an elongated soma with a heterochromatic nucleus, lysosomes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from segscope.analysis import COMPARTMENTS

CELL_TYPES: tuple[str, ...] = ("excitatory", "inhibitory", "astrocyte", "microglia")

AXON, DENDRITE, SOMA, GLIA = (COMPARTMENTS.index(c) for c in ("axon", "dendrite", "soma", "glia"))
EXCITATORY, INHIBITORY, ASTROCYTE, MICROGLIA = range(4)

# Node kinds steer rendering (vesicles, PSDs), never the painted intensity of cytoplasm.
SHAFT, SPINE_NECK, SPINE_HEAD, BOUTON, SOMA_NODE, BULB = range(6)

STEP_NM = 400.0  # skeleton node spacing along neurites


@dataclass
class Organelle:
    """One organelle, drawn inside the segment that owns ``node``.

    ``kind`` is one of "mito", "vesicles", "psd", "nucleus", "lysosome"; ``p0``/``p1`` are
    the ends of its axis in nm (equal for round ones) and ``radius_nm`` its radius.
    """

    kind: str
    node: int  # index into the owning cell's nodes
    p0: np.ndarray
    p1: np.ndarray
    radius_nm: float


@dataclass
class Cell:
    """A cell under construction: a rooted tree of nodes in nm plus organelles.

    ``bodies`` are extra round/elongated primitives (somata) as
    ``(node, p0, p1, radius_nm)``, painted with the segment of ``node``.
    """

    cell_type: int
    pos: list = field(default_factory=list)
    radius: list = field(default_factory=list)
    parent: list = field(default_factory=list)
    compartment: list = field(default_factory=list)
    kind: list = field(default_factory=list)
    bodies: list = field(default_factory=list)
    organelles: list = field(default_factory=list)

    def add(self, pos, radius: float, parent: int, compartment: int, kind: int = SHAFT) -> int:
        self.pos.append(np.asarray(pos, dtype=np.float64))
        self.radius.append(float(radius))
        self.parent.append(int(parent))
        self.compartment.append(int(compartment))
        self.kind.append(int(kind))
        return len(self.pos) - 1

    def add_chain(self, points, radii, parent: int, compartment: int, kind: int = SHAFT) -> list[int]:
        ids = []
        for p, r in zip(points, radii):
            parent = self.add(p, r, parent, compartment, kind)
            ids.append(parent)
        return ids


class Space:
    """The volume's physical extent and the random source shared by all builders."""

    #: Edge (nm) of the coarse occupancy grid used to seed neurites into empty space.
    GRID_NM = 256.0

    def __init__(self, rng: np.random.Generator, extent_nm: np.ndarray, margin_nm: float = 1200.0):
        self.rng = rng
        self.extent = np.asarray(extent_nm, dtype=np.float64)
        self.margin = margin_nm
        self.grid_shape = np.maximum(1, np.ceil(self.extent / self.GRID_NM).astype(int))
        self.occupancy = np.zeros(tuple(self.grid_shape), dtype=np.float64)
        self._smoothed: np.ndarray | None = None
        #: Registered cell bodies (p0, p1, radius nm) that later neurites steer around.
        self.bodies: list[tuple[np.ndarray, np.ndarray, float]] = []

    def body_clearance(self, p: np.ndarray) -> tuple[float, np.ndarray]:
        """Smallest (distance - radius) from ``p`` to a registered body, and that body's normal.

        The normal is the outward unit normal of the nearest body at ``p`` (nm).
        """
        best, normal = np.inf, np.zeros(3)
        for a, b, r in self.bodies:
            ab = b - a
            t = np.clip(np.dot(p - a, ab) / max(float(np.dot(ab, ab)), 1e-9), 0.0, 1.0)
            v = p - (a + t * ab)
            dist = float(np.linalg.norm(v))
            if dist - r < best:
                best, normal = dist - r, v / max(dist, 1e-9)
        return best, normal

    def register(self, cell: Cell) -> None:
        """Add a cell's rough volume to the occupancy grid (fraction of each grid cell)."""
        pos = np.array(cell.pos).reshape(-1, 3)
        if len(pos) == 0:
            return
        rad = np.array(cell.radius)
        ok = np.all((pos >= 0) & (pos < self.extent), axis=1)
        idx = np.floor(pos[ok] / self.GRID_NM).astype(int)
        volume = np.pi * rad[ok] ** 2 * STEP_NM / self.GRID_NM**3
        np.add.at(self.occupancy, tuple(idx.T), volume)
        for _, a, b, r in cell.bodies:
            self.bodies.append((np.asarray(a, float), np.asarray(b, float), float(r)))
            lo = np.maximum(np.floor((np.minimum(a, b) - r) / self.GRID_NM).astype(int), 0)
            hi = np.minimum(np.ceil((np.maximum(a, b) + r) / self.GRID_NM).astype(int), self.grid_shape)
            if np.any(hi <= lo):
                continue
            g = np.stack(np.meshgrid(*[np.arange(start, stop) for start, stop in zip(lo, hi)], indexing="ij"), -1)
            centres = (g + 0.5) * self.GRID_NM
            ab = b - a
            t = np.clip(((centres - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
            near = np.linalg.norm(centres - (a + t[..., None] * ab), axis=-1) < r
            sub = self.occupancy[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            sub[near] += 1.0
        self._smoothed = None

    def _density(self) -> np.ndarray:
        if self._smoothed is None:
            from scipy import ndimage

            self._smoothed = ndimage.gaussian_filter(self.occupancy, 1.0, mode="nearest")
        return self._smoothed

    def density_at(self, points: np.ndarray) -> np.ndarray:
        idx = np.floor(np.asarray(points).reshape(-1, 3) / self.GRID_NM).astype(int)
        idx = np.clip(idx, 0, self.grid_shape - 1)
        return self._density()[tuple(idx.T)]

    def emptiest_start(self, candidates: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """A start point and direction through the least occupied space among a few tries.

        Seeding neurites where the tissue is still empty spreads them evenly, like the
        space-filling packing of real neuropil, instead of leaving random voids.
        """
        points = self.extent * self.rng.random((candidates, 3))
        p = points[int(np.argmin(self.density_at(points)))]
        dirs = self.rng.normal(size=(candidates, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        steps = np.linspace(-3000.0, 3000.0, 13)
        cost = [self.density_at(p + steps[:, None] * d).sum() for d in dirs]
        return p, dirs[int(np.argmin(cost))]

    def inside(self, p: np.ndarray, margin: float = 0.0) -> bool:
        return bool(np.all(p >= -margin) and np.all(p < self.extent + margin))

    def random_direction(self) -> np.ndarray:
        v = self.rng.normal(size=3)
        return v / np.linalg.norm(v)

    def random_point(self, border_fraction: float = 0.0) -> np.ndarray:
        lo = self.extent * border_fraction
        return lo + self.rng.random(3) * (self.extent - 2 * lo)

    def perpendicular(self, axis: np.ndarray) -> np.ndarray:
        v = self.rng.normal(size=3)
        v -= axis * np.dot(v, axis)
        return v / np.linalg.norm(v)

    def walk(
        self, start, direction, *, sigma: float, max_steps: int, step: float = STEP_NM, stay_inside: bool = True
    ) -> np.ndarray:
        """Persistent random walk from ``start`` (excluded): ``[k, 3]`` points in nm.

        ``sigma`` is the direction noise per step (radians, roughly): small for straight
        axons, large for tortuous glial processes. Stops once past the volume margin.
        """
        p = np.asarray(start, dtype=np.float64)
        d = np.asarray(direction, dtype=np.float64)
        d = d / np.linalg.norm(d)
        out = []
        noise = self.rng.normal(size=(max_steps, 3)) * sigma
        for k in range(max_steps):
            d = d + noise[k]
            d /= np.linalg.norm(d)
            if self.bodies:
                # Neurites run around cell bodies, never through them: drop the inward part
                # of the direction near a body (a process leaving its own soma points out).
                clearance, normal = self.body_clearance(p + step * d)
                inward = np.dot(d, normal)
                if clearance < 150.0 and inward < 0:
                    d = d - (inward - 0.3) * normal
                    d /= np.linalg.norm(d)
            p = p + step * d
            out.append(p)
            if stay_inside and not self.inside(p, self.margin):
                break
        return np.array(out).reshape(-1, 3)

    def through_path(self, *, sigma: float, start=None, direction=None) -> np.ndarray:
        """A neurite crossing the volume: walks both ways from a point until past the margin."""
        if start is None:
            start, seeded_direction = self.emptiest_start()
            direction = seeded_direction if direction is None else direction
        start = np.asarray(start, dtype=np.float64)
        direction = self.random_direction() if direction is None else direction
        longest = int(4 * np.linalg.norm(self.extent + 2 * self.margin) / STEP_NM) + 2
        fwd = self.walk(start, direction, sigma=sigma, max_steps=longest)
        back = self.walk(start, -direction, sigma=sigma, max_steps=longest)
        return np.concatenate([back[::-1], start[None], fwd])

    def smooth_noise(self, n: int, scale: float, corr_steps: float = 4.0) -> np.ndarray:
        """1-D smooth multiplicative jitter (mean 1) for radii along a path."""
        raw = self.rng.normal(size=n + 8)
        kernel = np.exp(-0.5 * (np.arange(-8, 9) / corr_steps) ** 2)
        smooth = np.convolve(raw, kernel / np.sqrt((kernel**2).sum()), mode="same")[4 : 4 + n]
        return 1.0 + scale * np.clip(smooth, -2.5, 2.5)


def _tangents(points: np.ndarray) -> np.ndarray:
    t = np.gradient(points, axis=0) if len(points) > 1 else np.array([[1.0, 0, 0]])
    return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)


# ---------------------------------------------------------------- neurite decorations


def _add_spines(cell: Cell, space: Space, shaft_ids: list[int], *, spacing_nm: float, skip_first: int = 0) -> None:
    """Dendritic spines on a shaft: neck chain, round head with a PSD on its far side."""
    rng = space.rng
    pts = np.array([cell.pos[i] for i in shaft_ids])
    tangents = _tangents(pts)
    for j, node in enumerate(shaft_ids):
        if j < skip_first or rng.random() > STEP_NM / spacing_nm:
            continue
        u = space.perpendicular(tangents[j])
        r_shaft = cell.radius[node]
        stubby = rng.random() < 0.12
        mushroom = rng.random() < 0.6
        r_head = rng.uniform(190, 290) if mushroom else rng.uniform(120, 170)
        neck_len = 0.0 if stubby else rng.uniform(350, 1000)
        parent = node
        base = cell.pos[node] + u * r_shaft * 0.85
        n_neck = int(neck_len // 230)
        r_neck = rng.uniform(48, 62)
        for k in range(1, n_neck + 1):
            parent = cell.add(base + u * (k * neck_len / (n_neck + 1)), r_neck, parent, DENDRITE, SPINE_NECK)
        head_pos = base + u * (neck_len + r_head * 0.8)
        head = cell.add(head_pos, r_head, parent, DENDRITE, SPINE_HEAD)
        tip = head_pos + u * r_head
        cell.organelles.append(Organelle("psd", head, tip, tip, 130.0))


def _add_boutons(
    cell: Cell,
    space: Space,
    chain: list[int],
    *,
    interval_nm: tuple[float, float],
    radius_nm: tuple[float, float],
    length_nodes: int,
    mito_probability: float,
    mito_radius_nm: float,
) -> None:
    """En-passant varicosities with a vesicle cloud (and maybe a mitochondrion)."""
    rng = space.rng
    j = int(rng.uniform(0, interval_nm[1]) // STEP_NM)
    while j < len(chain) - 1:
        r_b = rng.uniform(*radius_nm)
        core = chain[j : j + length_nodes]
        for n in core:
            cell.radius[n] = max(cell.radius[n], r_b)
            cell.kind[n] = BOUTON
        for end in (chain[j - 1] if j > 0 else None, chain[min(j + length_nodes, len(chain) - 1)]):
            if end is not None and cell.kind[end] != BOUTON:
                cell.radius[end] = max(cell.radius[end], 0.5 * r_b)
        a, b = cell.pos[core[0]], cell.pos[core[-1]]
        centre = 0.5 * (a + b)
        cell.organelles.append(Organelle("vesicles", core[0], a, b, 0.65 * r_b))
        if rng.random() < mito_probability:
            off = space.random_direction() * 0.35 * r_b
            axis = (b - a) if len(core) > 1 else (cell.pos[chain[j + 1]] - a)
            axis = axis / max(np.linalg.norm(axis), 1e-9) * 0.45 * r_b
            cell.organelles.append(Organelle("mito", core[0], centre + off - axis, centre + off + axis, mito_radius_nm))
        j += length_nodes + int(rng.uniform(*interval_nm) // STEP_NM)


def _add_shaft_mitos(
    cell: Cell,
    space: Space,
    chain: list[int],
    *,
    every_nm: float,
    radius_fraction: tuple[float, float],
    max_radius_nm: float,
) -> None:
    """Elongated mitochondria along a shaft, off-centre, following its axis."""
    rng = space.rng
    j = int(rng.uniform(0, every_nm) // STEP_NM)
    while j < len(chain) - 2:
        k = min(len(chain) - 1, j + int(rng.integers(1, 5)))
        r_shaft = min(cell.radius[chain[j]], cell.radius[chain[k]])
        r = min(max_radius_nm, rng.uniform(*radius_fraction) * r_shaft)
        u = space.perpendicular(_tangents(np.array([cell.pos[chain[j]], cell.pos[chain[k]]]))[0])
        off = u * rng.uniform(0, 0.9) * max(r_shaft - r, 0) * 0.7
        cell.organelles.append(Organelle("mito", chain[j], cell.pos[chain[j]] + off, cell.pos[chain[k]] + off, r))
        j = k + 1 + int(rng.exponential(every_nm) // STEP_NM)


def _add_lysosomes(cell: Cell, space: Space, nodes: list[int], count: int) -> None:
    rng = space.rng
    for _ in range(count):
        n = nodes[int(rng.integers(len(nodes)))]
        r = rng.uniform(110, 190)
        room = max(cell.radius[n] - r - 40, 0)
        p = cell.pos[n] + space.random_direction() * rng.uniform(0, room)
        cell.organelles.append(Organelle("lysosome", n, p, p, r))


def _add_soma(
    cell: Cell,
    space: Space,
    centre,
    radius_nm: float,
    *,
    axis=None,
    elongation_nm: float = 0.0,
    nucleus_fraction: float = 0.6,
    n_mitos: int = 6,
    compartment: int = SOMA,
) -> int:
    """Round (or capsule-shaped) cell body with nucleus and mitochondria; returns its node."""
    rng = space.rng
    centre = np.asarray(centre, float)
    axis = space.random_direction() if axis is None else axis / np.linalg.norm(axis)
    root = cell.add(centre, radius_nm * 0.5, -1, compartment, SOMA_NODE)
    half = axis * elongation_nm / 2
    cell.bodies.append((root, centre - half, centre + half, radius_nm))
    # A few soma nodes along the long axis keep the skeleton inside the body.
    for sign in (-1, 1):
        parent = root
        for k in range(1, int((elongation_nm / 2 + 0.55 * radius_nm) // STEP_NM) + 1):
            parent = cell.add(centre + sign * axis * k * STEP_NM, radius_nm * 0.5, parent, compartment, SOMA_NODE)
    r_nuc = nucleus_fraction * radius_nm
    nuc_off = space.random_direction() * 0.08 * radius_nm
    cell.organelles.append(
        Organelle("nucleus", root, centre - half * 0.8 + nuc_off, centre + half * 0.8 + nuc_off, r_nuc)
    )
    for _ in range(n_mitos):
        d = space.random_direction()
        shell = radius_nm - r_nuc
        a = centre + d * (r_nuc + shell * rng.uniform(0.35, 0.65))
        t = space.perpendicular(d) * rng.uniform(200, 600)
        r_mito = min(rng.uniform(100, 160), 0.3 * shell)
        cell.organelles.append(Organelle("mito", root, a - t, a + t, r_mito))
    return root


def _soma_exit(
    cell: Cell, root: int, direction, radius_nm: float, r_neurite: float, compartment: int
) -> tuple[int, np.ndarray]:
    """Skeleton nodes from the soma centre to its surface along ``direction``."""
    centre = cell.pos[root]
    parent = root
    n = max(1, int(radius_nm // STEP_NM))
    for k in range(1, n + 1):
        parent = cell.add(centre + direction * k * STEP_NM, r_neurite, parent, SOMA, SOMA_NODE)
    return parent, centre + direction * n * STEP_NM


def _grow(
    cell: Cell,
    space: Space,
    parent: int,
    start,
    direction,
    *,
    r_start: float,
    r_end: float,
    taper_nm: float,
    sigma: float,
    compartment: int,
    max_len_nm: float,
    jitter: float = 0.08,
) -> list[int]:
    pts = space.walk(start, direction, sigma=sigma, max_steps=int(max_len_nm // STEP_NM) + 1)
    dist = np.arange(1, len(pts) + 1) * STEP_NM
    radii = r_end + (r_start - r_end) * np.exp(-dist / taper_nm)
    radii = radii * space.smooth_noise(len(pts), jitter)
    return cell.add_chain(pts, radii, parent, compartment)


# ---------------------------------------------------------------- neurites crossing the volume


def spiny_dendrite(space: Space) -> Cell:
    rng = space.rng
    cell = Cell(EXCITATORY)
    pts = space.through_path(sigma=0.09)
    r0 = rng.uniform(280, 430)
    chain = cell.add_chain(pts, r0 * space.smooth_noise(len(pts), 0.1), -1, DENDRITE)
    _add_shaft_mitos(cell, space, chain, every_nm=1500, radius_fraction=(0.25, 0.4), max_radius_nm=150)
    _add_spines(cell, space, chain, spacing_nm=rng.uniform(480, 750))
    if rng.random() < 0.35 and len(chain) > 6:
        j = int(rng.integers(2, len(chain) - 3))
        t = _tangents(pts)[j]
        d = t + space.perpendicular(t) * 1.2
        branch = _grow(
            cell,
            space,
            chain[j],
            cell.pos[chain[j]],
            d,
            r_start=0.8 * r0,
            r_end=0.7 * r0,
            taper_nm=3000,
            sigma=0.1,
            compartment=DENDRITE,
            max_len_nm=20000,
        )
        _add_spines(cell, space, branch, spacing_nm=rng.uniform(480, 750))
    return cell


def smooth_dendrite(space: Space) -> Cell:
    rng = space.rng
    cell = Cell(INHIBITORY)
    pts = space.through_path(sigma=0.07)
    r0 = rng.uniform(430, 620)
    chain = cell.add_chain(pts, r0 * space.smooth_noise(len(pts), 0.05), -1, DENDRITE)
    _add_shaft_mitos(cell, space, chain, every_nm=1300, radius_fraction=(0.22, 0.32), max_radius_nm=190)
    if rng.random() < 0.3 and len(chain) > 6:
        j = int(rng.integers(2, len(chain) - 3))
        t = _tangents(pts)[j]
        branch = _grow(
            cell,
            space,
            chain[j],
            cell.pos[chain[j]],
            t + space.perpendicular(t),
            r_start=0.8 * r0,
            r_end=0.75 * r0,
            taper_nm=3000,
            sigma=0.07,
            compartment=DENDRITE,
            max_len_nm=20000,
            jitter=0.04,
        )
        _add_shaft_mitos(cell, space, branch, every_nm=1300, radius_fraction=(0.22, 0.32), max_radius_nm=190)
    return cell


def _axon(
    space: Space,
    cell_type: int,
    cell: Cell | None,
    parent: int,
    pts: np.ndarray | None,
    *,
    path_sigma: float,
    radius_nm: tuple[float, float],
    radius_noise: float,
    bouton_interval_nm: tuple[float, float],
    bouton_radius_nm: tuple[float, float],
    bouton_length_nodes: int,
    mito_probability: float,
    mito_radius_nm: float,
) -> Cell:
    """An axon through the volume with boutons; the two neuron types differ only in numbers."""
    rng = space.rng
    cell = Cell(cell_type) if cell is None else cell
    pts = space.through_path(sigma=path_sigma) if pts is None else pts
    r = rng.uniform(*radius_nm)
    chain = cell.add_chain(pts, r * space.smooth_noise(len(pts), radius_noise), parent, AXON)
    _add_boutons(
        cell,
        space,
        chain,
        interval_nm=bouton_interval_nm,
        radius_nm=bouton_radius_nm,
        length_nodes=bouton_length_nodes,
        mito_probability=mito_probability,
        mito_radius_nm=mito_radius_nm,
    )
    return cell


def excitatory_axon(space: Space, cell: Cell | None = None, parent: int = -1, pts: np.ndarray | None = None) -> Cell:
    """Thin axon, small boutons (one node long), few of them with a mitochondrion."""
    return _axon(
        space,
        EXCITATORY,
        cell,
        parent,
        pts,
        path_sigma=0.1,
        radius_nm=(75, 135),
        radius_noise=0.12,
        bouton_interval_nm=(2400, 5500),
        bouton_radius_nm=(220, 330),
        bouton_length_nodes=1,
        mito_probability=0.35,
        mito_radius_nm=70,
    )


def inhibitory_axon(space: Space, cell: Cell | None = None, parent: int = -1, pts: np.ndarray | None = None) -> Cell:
    """Thicker, more tortuous axon with larger, denser boutons that nearly all hold a mitochondrion."""
    return _axon(
        space,
        INHIBITORY,
        cell,
        parent,
        pts,
        path_sigma=0.16,
        radius_nm=(115, 165),
        radius_noise=0.08,
        bouton_interval_nm=(2000, 3800),
        bouton_radius_nm=(340, 480),
        bouton_length_nodes=2,
        mito_probability=0.95,
        mito_radius_nm=105,
    )


def _astro_branches(cell: Cell, space: Space, chain: list[int], *, every_nm: float, depth: int) -> None:
    """Fine, short, irregular side branches that branch again (bushy)."""
    rng = space.rng
    pts = np.array([cell.pos[i] for i in chain])
    tangents = _tangents(pts)
    for j, node in enumerate(chain):
        if rng.random() > STEP_NM / every_nm:
            continue
        d = space.perpendicular(tangents[j]) + 0.3 * tangents[j]
        length = rng.uniform(500, 1600)
        r = rng.uniform(80, 115)
        sub = _grow(
            cell,
            space,
            node,
            cell.pos[node],
            d,
            r_start=r,
            r_end=0.8 * r,
            taper_nm=1500,
            sigma=0.55,
            compartment=GLIA,
            max_len_nm=length,
            jitter=0.15,
        )
        if depth > 0 and sub:
            _astro_branches(cell, space, sub, every_nm=every_nm * 1.3, depth=depth - 1)


def astrocyte_process(space: Space) -> Cell:
    """A main astrocytic process entering from a soma outside the volume."""
    rng = space.rng
    cell = Cell(ASTROCYTE)
    pts = space.through_path(sigma=0.3)
    r0 = rng.uniform(170, 260)
    chain = cell.add_chain(pts, r0 * space.smooth_noise(len(pts), 0.2), -1, GLIA)
    _add_shaft_mitos(cell, space, chain, every_nm=3500, radius_fraction=(0.35, 0.5), max_radius_nm=100)
    _astro_branches(cell, space, chain, every_nm=650, depth=1)
    return cell


# ---------------------------------------------------------------- cells with a soma


def _soma_centre(space: Space, radius_nm: float, tries: int = 20) -> np.ndarray:
    """A soma centre inside the volume but near a face, so the body is cut by the border.

    It keeps away from the bodies placed before (best of a few tries).
    """
    rng = space.rng
    best, best_gap = None, -np.inf
    for _ in range(tries):
        c = space.random_point(0.25)
        axis = int(rng.integers(3))
        depth = rng.uniform(0.15, 0.6) * radius_nm
        c[axis] = depth if rng.random() < 0.5 else space.extent[axis] - depth
        gap = space.body_clearance(c)[0] - radius_nm
        if gap > best_gap:
            best, best_gap = c, gap
        if gap > 300.0:
            break
    if best is None:
        raise ValueError(f"no soma centre found in {tries} tries")
    return best


def _free_point(space: Space, radius_nm: float, border_fraction: float, tries: int = 20) -> np.ndarray:
    best, best_gap = None, -np.inf
    for _ in range(tries):
        c = space.random_point(border_fraction)
        gap = space.body_clearance(c)[0] - radius_nm
        if gap > best_gap:
            best, best_gap = c, gap
        if gap > 300.0:
            break
    if best is None:
        raise ValueError(f"no free point found in {tries} tries")
    return best


def pyramidal_cell(space: Space) -> Cell:
    rng = space.rng
    cell = Cell(EXCITATORY)
    R = rng.uniform(2300, 2800)
    root = _add_soma(cell, space, _soma_centre(space, R), R, nucleus_fraction=0.62, n_mitos=10)
    apical = space.random_direction()
    node, p = _soma_exit(cell, root, apical, R, 650, DENDRITE)
    chain = _grow(
        cell,
        space,
        node,
        p,
        apical,
        r_start=800,
        r_end=520,
        taper_nm=5000,
        sigma=0.04,
        compartment=DENDRITE,
        max_len_nm=20000,
        jitter=0.04,
    )
    _add_shaft_mitos(cell, space, chain, every_nm=1000, radius_fraction=(0.2, 0.3), max_radius_nm=170)
    _add_spines(cell, space, chain, spacing_nm=700, skip_first=3)
    for _ in range(int(rng.integers(3, 6))):
        d = space.random_direction()
        if np.dot(d, apical) > 0.2:
            d = d - 1.2 * np.dot(d, apical) * apical
            d /= np.linalg.norm(d)
        node, p = _soma_exit(cell, root, d, R, 450, DENDRITE)
        chain = _grow(
            cell,
            space,
            node,
            p,
            d,
            r_start=520,
            r_end=320,
            taper_nm=2500,
            sigma=0.12,
            compartment=DENDRITE,
            max_len_nm=15000,
        )
        _add_shaft_mitos(cell, space, chain, every_nm=1500, radius_fraction=(0.25, 0.4), max_radius_nm=140)
        _add_spines(cell, space, chain, spacing_nm=600, skip_first=2)
    d = -apical + 0.3 * space.random_direction()
    d /= np.linalg.norm(d)
    node, p = _soma_exit(cell, root, d, R, 300, AXON)
    ais = _grow(
        cell,
        space,
        node,
        p,
        d,
        r_start=300,
        r_end=150,
        taper_nm=1500,
        sigma=0.05,
        compartment=AXON,
        max_len_nm=2400,
        jitter=0.03,
    )
    if ais:
        rest = space.walk(cell.pos[ais[-1]], d, sigma=0.1, max_steps=80)
        excitatory_axon(space, cell, ais[-1], rest)
    return cell


def basket_cell(space: Space) -> Cell:
    rng = space.rng
    cell = Cell(INHIBITORY)
    R = rng.uniform(1700, 2100)
    root = _add_soma(cell, space, _soma_centre(space, R), R, nucleus_fraction=0.6, n_mitos=9)
    for _ in range(int(rng.integers(4, 7))):
        d = space.random_direction()
        node, p = _soma_exit(cell, root, d, R, 520, DENDRITE)
        chain = _grow(
            cell,
            space,
            node,
            p,
            d,
            r_start=620,
            r_end=470,
            taper_nm=3000,
            sigma=0.08,
            compartment=DENDRITE,
            max_len_nm=15000,
            jitter=0.04,
        )
        _add_shaft_mitos(cell, space, chain, every_nm=1300, radius_fraction=(0.22, 0.32), max_radius_nm=180)
    d = space.random_direction()
    node, p = _soma_exit(cell, root, d, R, 250, AXON)
    ais = _grow(
        cell,
        space,
        node,
        p,
        d,
        r_start=250,
        r_end=140,
        taper_nm=1200,
        sigma=0.1,
        compartment=AXON,
        max_len_nm=1600,
        jitter=0.03,
    )
    if ais:
        rest = space.walk(cell.pos[ais[-1]], d, sigma=0.16, max_steps=80)
        inhibitory_axon(space, cell, ais[-1], rest)
    return cell


def protoplasmic_astrocyte(space: Space) -> Cell:
    rng = space.rng
    cell = Cell(ASTROCYTE)
    R = rng.uniform(1400, 1800)
    root = _add_soma(cell, space, _soma_centre(space, R), R, nucleus_fraction=0.68, n_mitos=5, compartment=GLIA)
    for _ in range(int(rng.integers(5, 8))):
        d = space.random_direction()
        node, p = _soma_exit(cell, root, d, R, 380, GLIA)
        cell.compartment[node] = GLIA
        chain = _grow(
            cell,
            space,
            node,
            p,
            d,
            r_start=420,
            r_end=160,
            taper_nm=1800,
            sigma=0.3,
            compartment=GLIA,
            max_len_nm=9000,
            jitter=0.2,
        )
        _astro_branches(cell, space, chain, every_nm=550, depth=1)
    # Glial soma nodes are "glia", not "soma": the soma class is for neurons' bodies here.
    cell.compartment = [GLIA] * len(cell.compartment)
    return cell


def microglia(space: Space, with_soma: bool = True) -> Cell:
    """Few thick, tortuous processes with bulbous tips from an elongated soma."""
    rng = space.rng
    cell = Cell(MICROGLIA)
    tips: list[int] = []
    if with_soma:
        R = rng.uniform(1000, 1200)
        axis = space.random_direction()
        centre = _free_point(space, R + 650, border_fraction=0.3)
        root = _add_soma(
            cell, space, centre, R, axis=axis, elongation_nm=1300, nucleus_fraction=0.7, n_mitos=3, compartment=GLIA
        )
        _add_lysosomes(cell, space, [root], int(rng.integers(2, 5)))
        starts = []
        for _ in range(int(rng.integers(3, 5))):
            d = space.random_direction()
            node, p = _soma_exit(cell, root, d, R + 650 * abs(np.dot(d, axis)), 400, GLIA)
            starts.append((node, p, d))
    else:
        p = space.random_point()
        d = space.random_direction()
        root = cell.add(p, 380, -1, GLIA)
        starts = [(root, p, d), (root, p, -d)]
    for node, p, d in starts:
        chain = _grow(
            cell,
            space,
            node,
            p,
            d,
            r_start=420,
            r_end=320,
            taper_nm=3000,
            sigma=0.45,
            compartment=GLIA,
            max_len_nm=rng.uniform(2400, 5600),
            jitter=0.12,
        )
        if not chain:
            continue
        _add_lysosomes(cell, space, chain, int(rng.integers(0, 2)))
        _add_shaft_mitos(cell, space, chain, every_nm=3000, radius_fraction=(0.3, 0.4), max_radius_nm=120)
        tips.append(chain[-1])
        if rng.random() < 0.5 and len(chain) > 3:
            j = chain[int(rng.integers(1, len(chain) - 1))]
            sub = _grow(
                cell,
                space,
                j,
                cell.pos[j],
                space.random_direction(),
                r_start=340,
                r_end=300,
                taper_nm=3000,
                sigma=0.45,
                compartment=GLIA,
                max_len_nm=rng.uniform(1200, 2800),
                jitter=0.12,
            )
            if sub:
                tips.append(sub[-1])
    for t in tips:
        cell.radius[t] = rng.uniform(520, 680)
        cell.kind[t] = BULB
    cell.compartment = [GLIA] * len(cell.compartment)
    return cell


# ---------------------------------------------------------------- the population


def _cable_volume_inside(cell: Cell, space: Space) -> float:
    """Rough painted volume (um^3) of a cell's tubes inside the volume, for density budgets."""
    pos = np.array(cell.pos)
    rad = np.array(cell.radius)
    par = np.array(cell.parent)
    inside = np.all((pos >= 0) & (pos < space.extent), axis=1)
    child = np.nonzero((par >= 0) & inside)[0]
    if len(child) == 0:
        return 0.0
    length = np.linalg.norm(pos[child] - pos[par[child]], axis=1)
    r = 0.5 * (rad[child] + rad[par[child]])
    return float(np.sum(np.pi * r**2 * length)) * 1e-9


def build_population(space: Space) -> list[Cell]:
    """All cells of one synthetic volume, in a fixed order (deterministic for a seed).

    Neurite classes are added until their rough painted volume reaches a target fraction
    of the volume; overlaps are resolved later by the painter (like compressed tissue).
    """
    rng = space.rng
    volume_um3 = float(np.prod(space.extent)) * 1e-9
    cells: list[Cell] = []

    def count(per_um3: float) -> int:
        expected = volume_um3 * per_um3
        return int(expected) + int(rng.random() < expected - int(expected))

    # Bodies first: they are the largest objects and claim space before neurites squeeze in.
    builders = (
        [pyramidal_cell] * max(1, count(1 / 600))
        + [basket_cell] * count(1 / 650)
        + [protoplasmic_astrocyte] * count(1 / 700)
        + [lambda s: microglia(s, with_soma=True)]
        # Far more microglial processes than cortex has (about 1 in 500 um^3): the held-out
        # type needs enough segments for a meaningful out-of-distribution AUROC.
        + [lambda s: microglia(s, with_soma=False)] * count(1 / 50)
    )
    for builder in builders:
        cell = builder(space)
        space.register(cell)
        cells.append(cell)

    targets = [  # (builder, fraction of the volume)
        (smooth_dendrite, 0.06),
        (spiny_dendrite, 0.18),
        (astrocyte_process, 0.05),
        (inhibitory_axon, 0.09),
        (excitatory_axon, 0.45),
    ]
    for builder, fraction in targets:
        filled = 0.0
        while filled < fraction * volume_um3:
            cell = builder(space)
            filled += _cable_volume_inside(cell, space)
            space.register(cell)
            cells.append(cell)
    return cells
