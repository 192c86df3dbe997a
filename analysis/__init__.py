"""SegScope's pure compute layer: volumes, demo data, SegCLR encoder, classifiers, I/O.

Conventions used across the package
-----------------------------------
* Spatial arrays are indexed ``[x, y, z]`` (TensorStore's Neuroglancer-precomputed order,
  channel dropped). Batched cutouts are ``[B, x, y, z]``.
* Physical coordinates are nanometres, given as ``[..., 3]`` arrays in x, y, z order.
  Voxel coordinates are integers in the same order; ``nm = voxel * voxel_size_nm``
  (the voxel's corner; its centre is ``(voxel + 0.5) * voxel_size_nm``).
* Subcompartment codes (``COMPARTMENTS``) index ``("axon", "dendrite", "soma", "glia")``.
* Nothing here imports Qt or ``app``; heavy libraries (tensorflow, keras, umap) are
  imported inside the functions that need them.
"""

from importlib.metadata import PackageNotFoundError, version as _version

COMPARTMENTS: tuple[str, ...] = ("axon", "dendrite", "soma", "glia")
#: Compartment code of a node with no known subcompartment (unlabelled, not predicted).
UNKNOWN_COMPARTMENT = 255


def compartment_codes(class_names, source: str = "the compartment classifier"):
    """uint8 codes into :data:`COMPARTMENTS` of a compartment classifier's ``class_names``.

    Raises
    ------
    ValueError
        When a class is not a subcompartment SegScope knows (the message names ``source``).
    """
    import numpy as np

    unknown = [name for name in class_names if name not in COMPARTMENTS]
    if unknown:
        raise ValueError(
            f"{source} predicts {unknown}, which are not subcompartments SegScope knows ({', '.join(COMPARTMENTS)})"
        )
    return np.asarray([COMPARTMENTS.index(name) for name in class_names], dtype=np.uint8)


try:
    #: SegScope's version; pyproject.toml is the one place it is written.
    __version__ = _version("segscope")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

__all__ = ["COMPARTMENTS", "UNKNOWN_COMPARTMENT", "__version__", "compartment_codes"]
