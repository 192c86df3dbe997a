"""Ground-truth circuit of the demo: synapses at contact sites and per-cell function.

Synapses
    Every pair of touching segments (``segscope.analysis.synapses.contact_sites``) is a
    candidate connection in both directions. Direction ``a -> b`` is drawn with the
    probability :data:`CONNECTION_RULES` gives for (type of a, type of b): excitatory ->
    inhibitory dense, inhibitory -> excitatory fairly dense, glia never. The planted motif:
    an excitatory -> excitatory connection is reciprocated with probability
    :data:`RECIPROCAL_EE` (instead of the base rate), so E-E reciprocal pairs are far
    more common than degrees or type densities explain. A connection has
    ``1 + Poisson(faces / FACES_PER_EXTRA_SYNAPSE)`` synapses, each at a different face of
    the contact. Direction comes from types only: the demo's segments are fragments, and
    asking for an axon on the presynaptic side would leave almost no E-E pair that could
    be reciprocal.

Function
    Each neuron (cell) gets a ``response_strength`` (type mean, widened by its mean
    neurite calibre, plus noise; glia 0) and a ``preferred_orientation_deg`` (the angle in
    the xy plane of its skeleton nodes' principal axis plus 15 degrees of noise, in
    [0, 180); glia NaN). Every segment carries its cell's values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ._morphology import CELL_TYPES

#: P(a -> b | a and b touch), by (pre type, post type); pairs not listed: 0 (glia).
CONNECTION_RULES: dict[tuple[str, str], float] = {
    ("excitatory", "excitatory"): 0.10,
    ("excitatory", "inhibitory"): 0.50,
    ("inhibitory", "excitatory"): 0.35,
    ("inhibitory", "inhibitory"): 0.15,
}
#: P(b -> a | a -> b drawn, b -> a not drawn), both excitatory: the planted reciprocity.
RECIPROCAL_EE = 0.6
#: A connection gains one synapse per this many shared voxel faces (Poisson mean).
FACES_PER_EXTRA_SYNAPSE = 150.0
#: Functional ground truth: mean response strength per type (a.u.), and its noise.
RESPONSE_MEAN = {"excitatory": 1.0, "inhibitory": 2.0, "astrocyte": 0.0, "microglia": 0.0}
RESPONSE_NOISE = 0.15
ORIENTATION_NOISE_DEG = 15.0


def expected_connection_probability() -> dict[tuple[str, str], float]:
    """P(a -> b | touching) the generator produces, reciprocity included, for every type pair."""
    rates = {(a, b): 0.0 for a in CELL_TYPES for b in CELL_TYPES}
    rates.update(CONNECTION_RULES)
    p = CONNECTION_RULES[("excitatory", "excitatory")]
    # a -> b exists if drawn (p) or if only b -> a was drawn and reciprocated.
    rates[("excitatory", "excitatory")] = p + (1 - p) * p * RECIPROCAL_EE
    return rates


def place_synapses(vol, rng: np.random.Generator):
    """Synapses of a ``SyntheticVolume`` and its contact sites: ``(SynapseTable, ContactSites)``."""
    from segscope.analysis.synapses import SynapseTable, contact_sites

    contacts = contact_sites(vol.segmentation, vol.voxel_size_nm)
    type_of = dict(zip(np.asarray(vol.segment_ids).tolist(), vol.cell_types))
    a_types = [type_of[int(a)] for a in contacts.pairs[:, 0]]
    b_types = [type_of[int(b)] for b in contacts.pairs[:, 1]]
    n = len(contacts.pairs)
    p_ab = np.array([CONNECTION_RULES.get((s, t), 0.0) for s, t in zip(a_types, b_types)])
    p_ba = np.array([CONNECTION_RULES.get((t, s), 0.0) for s, t in zip(a_types, b_types)])
    ab = rng.random(n) < p_ab
    ba = rng.random(n) < p_ba
    both_e = np.array([s == t == "excitatory" for s, t in zip(a_types, b_types)], dtype=bool)
    reciprocate = both_e & (ab ^ ba) & (rng.random(n) < RECIPROCAL_EE)
    ab |= reciprocate
    ba |= reciprocate
    pre, post, xyz = [], [], []
    for p in np.flatnonzero(ab | ba).tolist():
        faces = contacts.face_xyz_nm[contacts.face_start[p] : contacts.face_start[p + 1]]
        a, b = int(contacts.pairs[p, 0]), int(contacts.pairs[p, 1])
        for source, target, on in ((a, b, ab[p]), (b, a, ba[p])):
            if not on:
                continue
            count = min(len(faces), 1 + int(rng.poisson(len(faces) / FACES_PER_EXTRA_SYNAPSE)))
            picked = rng.choice(len(faces), size=count, replace=False)
            pre += [source] * count
            post += [target] * count
            xyz.append(faces[np.sort(picked)])
    synapses = SynapseTable(
        np.array(pre, dtype=np.uint64),
        np.array(post, dtype=np.uint64),
        np.concatenate(xyz) if xyz else np.zeros((0, 3)),
    )
    return synapses, contacts


def functional_properties(vol, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-segment ``response_strength`` and ``preferred_orientation_deg`` (float64 ``[S]``), per cell."""
    cell_ids = np.asarray(vol.cell_ids)
    types = np.asarray(vol.cell_types, dtype=object)
    mean_radius = np.array(
        [float(np.mean(s.radius_nm)) if s.radius_nm is not None and s.n_nodes else np.nan for s in vol.skeletons]
    )
    strength = np.zeros(len(cell_ids))
    orientation = np.full(len(cell_ids), np.nan)
    for cell in np.unique(cell_ids).tolist():
        rows = np.flatnonzero(cell_ids == cell)
        cell_type = str(types[rows[0]])
        if cell_type not in ("excitatory", "inhibitory"):
            continue
        nodes = np.concatenate([vol.skeletons[r].nodes_nm for r in rows])
        # Calibre: thicker neurites respond more strongly (a morphology tie), +-30 %.
        calibre = float(np.nanmean(mean_radius[rows]))
        same = np.array([t == cell_type for t in types]) & np.isfinite(mean_radius)
        typical = float(np.median(mean_radius[same])) if same.any() else calibre
        value = RESPONSE_MEAN[cell_type] * (1 + 0.3 * np.tanh(calibre / typical - 1)) + rng.normal(0, RESPONSE_NOISE)
        strength[rows] = max(value, 0.0)
        xy = nodes[:, :2] - nodes[:, :2].mean(axis=0)
        if len(xy) >= 2:
            _, _, vt = np.linalg.svd(xy, full_matrices=False)
            angle = np.degrees(np.arctan2(vt[0, 1], vt[0, 0]))
        else:
            angle = rng.uniform(0, 180)
        orientation[rows] = (angle + rng.normal(0, ORIENTATION_NOISE_DEG)) % 180.0
    return {"response_strength": strength, "preferred_orientation_deg": orientation}


def write_circuit(out: Path, vol) -> None:
    """Write the demo's circuit into dataset folder ``out``.

    ``synapses.parquet``, the ``synapses`` annotation layer, the function columns of
    ``segments.parquet`` and the rules into ``dataset.json`` (``"synapses"`` entry).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from segscope.analysis.progress import drive
    from segscope.analysis.synapses import write_synapse_annotations, write_synapse_table

    # Its own stream: the volume's bytes do not change when these rules do.
    rng = np.random.default_rng(np.random.SeedSequence([int(vol.seed), 0x5A1A95E]))
    synapses, contacts = place_synapses(vol, rng)
    write_synapse_table(out / "synapses.parquet", synapses)
    drive(write_synapse_annotations(out / "synapses", synapses))
    properties = functional_properties(vol, rng)
    table = pq.read_table(out / "segments.parquet")
    by_row = {int(s): i for i, s in enumerate(np.asarray(vol.segment_ids).tolist())}
    rows = np.array([by_row[int(s)] for s in table.column("segment_id").to_numpy()], dtype=np.int64)
    for name, values in properties.items():
        table = table.append_column(name, pa.array(values[rows], pa.float64(), mask=np.isnan(values[rows])))
    pq.write_table(table, out / "segments.parquet")
    meta_path = out / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["synapses"] = {
        "table": "synapses.parquet",
        "annotations": "synapses",
        "count": len(synapses),
        "touching_pairs": len(contacts.pairs),
        "connection_rules": [{"pre": a, "post": b, "p": p} for (a, b), p in CONNECTION_RULES.items()],
        "planted_motif": {"motif": "reciprocal", "types": ["excitatory", "excitatory"], "p": RECIPROCAL_EE},
        "faces_per_extra_synapse": FACES_PER_EXTRA_SYNAPSE,
    }
    meta["functional_properties"] = sorted(properties)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
