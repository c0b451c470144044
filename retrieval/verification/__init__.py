"""Spatial verification: descriptor matching, affine RANSAC and shortlist re-ranking.

The protocol follows the Detect-to-Retrieve authors' (DELF ``RerankByGeometricVerification``):
the top 100 of the first-stage ranking (junk removed per protocol) are matched to the query;
pairs with at least 4 putative matches run an affine RANSAC (3-point samples, 10 px residual
threshold, 1000 trials); the shortlist is re-ranked by (inliers, first-stage score).

Matching is per descriptor type (each features preset of :mod:`retrieval.features` carries
its ``verification`` defaults, which :func:`retrieval.runner.conf.verification_conf` applies):

* DELF: 1-NN with L2 distance below ``max_distance`` (the authors' 0.8);
* RootSIFT: Lowe's ratio test (``ratio`` 0.8: the nearest neighbour closer than 0.8 times the
  second) and ``mutual`` nearest neighbours. An absolute distance does not work for RootSIFT:
  nearly every 1-NN is closer than 0.9, and on real photos unrelated pairs then got as many
  "inliers" (8-23) as hard positives.

Re-ranking never punishes a lack of evidence: a pair with fewer than ``min_inliers`` inliers is
*unverified* and keeps its first-stage order among the unverified; verified pairs go ahead of
them, by inliers. The residual ``threshold`` is in pixels of the image at the features'
extraction size (``max_side``, 1,024 px by default): keypoints are stored in original pixels,
so it is scaled by the database image's ``scale`` (original pixels per extracted pixel).

Modules, one job each:

* :mod:`~retrieval.verification.conf`: :class:`VerificationConf`, :class:`Features` and the
  result types;
* :mod:`~retrieval.verification.matching`: 1-NN / ratio / mutual matching;
* :mod:`~retrieval.verification.ransac`: the seeded affine RANSAC;
* :mod:`~retrieval.verification.pairs`: a pair, a query batched over its candidates, many
  queries in a thread pool;
* :mod:`~retrieval.verification.rerank`: re-ranking a shortlist, a Revisited ranking under
  every protocol in one pass;
* :mod:`~retrieval.verification.io`: reading features from the project's HDF5;
* :mod:`~retrieval.verification._kernels`: the compiled (numba) loops.

Speed: per query, one faiss SGEMM per candidate gives the whole distance matrix, compiled loops
find both nearest neighbours and the mutual check on it (a mutual ratio test with ``faiss.knn``
needs two products), and a compiled RANSAC fits and scores every seeded 3-point sample. The
vectorised numpy implementation stays behind ``backend="numpy"`` and the naive per-pair
reference (:func:`verify_pair_naive`: a k-d tree and a plain loop over trials, like the
authors' scikit-image code) for the tests; all three give the same inliers
(``benchmarks/verification_speed.py`` compares them with faiss + ``cv2.estimateAffine2D``).
The API is general: any two images' keypoints (N, 2) and descriptors (N, D) give an affine
transform and an inlier mask (the annotation package reuses it for automatic boxes).

Two more notes on settings:

* one guard is added to the paper's RANSAC, on by default (``max_scale=10``): models that
  scale areas by more than 100x or less than 1/100 are refused. 1-NN matching is many-to-one,
  and without the guard a model collapsing many query points onto one database point counts
  those duplicates as inliers (an unrelated pair of real photos scored 59 "inliers");
* the :class:`VerificationConf` defaults are the paper's (DELF, 1-NN below 0.9); the features
  presets override them (RootSIFT: ratio 0.8, mutual, at least 10 inliers).
"""

from __future__ import annotations

from retrieval.verification.conf import (
    BACKENDS,
    AffineResult,
    Features,
    LocalFeatures,
    PairResult,
    VerificationConf,
)
from retrieval.verification.io import read_features_h5
from retrieval.verification.matching import (
    QueryMatcher,
    match_descriptors,
    match_descriptors_naive,
)
from retrieval.verification.pairs import verify_many, verify_pair, verify_pair_naive, verify_query
from retrieval.verification.ransac import (
    estimate_affine_ransac,
    estimate_affine_ransac_naive,
    ransac_samples,
)
from retrieval.verification.rerank import (
    RerankResult,
    RevisitedRerank,
    rerank,
    rerank_revisited,
)

__all__ = [
    "BACKENDS",
    "AffineResult",
    "Features",
    "LocalFeatures",
    "PairResult",
    "QueryMatcher",
    "RerankResult",
    "RevisitedRerank",
    "VerificationConf",
    "estimate_affine_ransac",
    "estimate_affine_ransac_naive",
    "match_descriptors",
    "match_descriptors_naive",
    "ransac_samples",
    "read_features_h5",
    "rerank",
    "rerank_revisited",
    "verify_many",
    "verify_pair",
    "verify_pair_naive",
    "verify_query",
]
