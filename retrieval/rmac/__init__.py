"""MAC / R-MAC global descriptors, AML re-ranking and query expansion (Tolias et al., ICLR 2016).

The pipeline of "Particular object retrieval with integral max-pooling of CNN activations":

1. **Activations**: the last convolutional map of a Keras backbone (ResNet50/101: the output of
   ``conv5_block3``; VGG16: ``block5_conv3`` after its ReLU, i.e. before ``pool5``), images at
   any size and aspect ratio, downscaled to ``max_side``. Queries are cropped to their
   ground-truth box at the database's scale.
2. **MAC** is the per-channel maximum over the whole map; **R-MAC** max-pools the square regions
   of the R-MAC grid (:func:`retrieval.regions.rmac_grid`, evaluated on the map's cells, shared
   with the RMACB region source), L2-normalises each regional vector, PCA-whitens it (learned on
   another dataset's regional vectors), L2-normalises again, sums and L2-normalises.
3. **AML** (approximate max-pooling localisation): the max over a window is approximated by the
   generalised mean ``(sum_p x(p)^alpha)^(1/alpha)`` (``alpha = 10``), read in O(1) per channel
   from integral images of ``x^alpha``. Candidate windows lie on a grid of step ``t`` (in map
   cells) and keep an aspect ratio within a factor ``s`` of the query's; the best window (cosine
   with the query's MAC vector) is refined by coordinate descent (steps ``3, 2, 1``, five rounds
   each). The top ``N`` images are re-ranked by the similarity of the query's R-MAC with the
   R-MAC of their localised window (computed on the window's activations).
4. **Query expansion**: the mean of the query vector and the top 5 re-ranked window vectors
   re-ranks the top ``N`` again.

These are the semantics of the authors' released MATLAB/MEX code (``test.m``, ``aml.c``); the
database activations are stored quantised to 8 bits per value (the authors used 4 bits). One
difference: when no window passes the aspect-ratio filter, the search starts from the whole map
with its real score (``aml.c`` starts from a score of -1e11). Cost: AML re-ranking computes the
float64 integral images of every re-ranked map per query, which dominates its time
(``benchmarks/aml_rerank.py``).

Files (under ``OUT/rmac``)::

    features/<tag>/<name>.h5       per image: regional (R, C) L2-normalised regional max-pooled
                                   vectors, mac (C,), optionally maps uint8 (h, w, C) + scale (C,)
    whitening/<tag>-<trainset>/whitening.npz   mean (C,), proj (d, C), eigvals (d,)
    descriptors/<mac|rmac|learned-rmac>-<tag>-<trainset>-<dataset>/db.npy, query.npy
    results/<method>-<tag>-<trainset>-<dataset>/ranks.npy, metrics.json, config.yaml
                                   (AML methods: search/ranks.npy, the ranking AML re-ranks)

:func:`run_rmac` is written like the retrieval runner (:mod:`retrieval.runner.run`): a tuple of
stages (:data:`~retrieval.rmac.stage.STAGES`: features, whitening, describe, search, aml,
evaluate) from files to files, each skipping what is done, ``until=`` to stop early, and the
per-image activations (and learned R-MAC's descriptors) computed shard by shard on
``gldboxes.executor`` (serial or Ray).

Modules: :mod:`~retrieval.rmac.backbone` (Keras backbones, image loading),
:mod:`~retrieval.rmac.pooling` (R-MAC grid, regional max-pooling), :mod:`~retrieval.rmac.whitening`
(PCA whitening, R-MAC aggregation), :mod:`~retrieval.rmac.aml` (AML localisation and re-ranking,
query expansion), :mod:`~retrieval.rmac.learned` (learned R-MAC, Gordo et al.) and
:mod:`~retrieval.rmac.activations` (the activation files, their executor stage),
:mod:`~retrieval.rmac.triplets` (triplet loss and mining for learned R-MAC) and
:mod:`~retrieval.rmac.stage` (presets, :data:`~retrieval.rmac.stage.STAGES`,
:func:`run_rmac`). TensorFlow/Keras is imported inside the functions that need it.
"""

from retrieval.rmac.aml import (
    aml_localize,
    aml_localize_loop,
    aml_rerank,
    aml_windows,
    approx_max,
    integral_images,
    query_expansion,
    search,
)
from retrieval.rmac.backbone import BACKBONES, Backbone, build_backbone, load_rgb
from retrieval.rmac.pooling import (
    map_descriptors,
    region_max_pool,
    region_max_pool_loop,
    rmac_regions,
)
from retrieval.rmac.stage import (
    METHODS,
    STAGES,
    RmacResult,
    confs,
    extract,
    read_features,
    resolve_conf,
    run_rmac,
)
from retrieval.rmac.whitening import FORMAT_VERSION, Whitening, aggregate_rmac, learn_whitening

__all__ = [
    "BACKBONES",
    "FORMAT_VERSION",
    "METHODS",
    "STAGES",
    "Backbone",
    "RmacResult",
    "Whitening",
    "aggregate_rmac",
    "aml_localize",
    "aml_localize_loop",
    "aml_rerank",
    "aml_windows",
    "approx_max",
    "build_backbone",
    "confs",
    "extract",
    "integral_images",
    "learn_whitening",
    "load_rgb",
    "map_descriptors",
    "query_expansion",
    "read_features",
    "region_max_pool",
    "region_max_pool_loop",
    "resolve_conf",
    "rmac_regions",
    "run_rmac",
    "search",
]
