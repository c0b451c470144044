"""Google Landmarks v2 benchmarks: a benchmark folder from a solution CSV, mAP@100 and GAP.

The GLDv2 challenges (Kaggle 2019-2021, Weyand et al. CVPR 2020) ship their ground truth as
solution CSVs beside the test split (:data:`gldboxes.gld.GLDV2_METADATA`)::

    retrieval_solution_v2.1.csv     id,images,Usage      images: space-separated index ids
    recognition_solution_v2.1.csv   id,landmarks,Usage   landmarks: space-separated ids or empty

``Usage`` is ``Public``, ``Private`` or ``Ignored``; Ignored queries are never scored. The
metrics, as the challenges define them (and the organisers' ``metrics.py`` computes them):

* **mAP@100** (retrieval): for query q with m_q relevant index images and its predictions
  truncated at k = 100, ``AP@k(q) = 1/min(m_q, k) * sum_{i<=k} P_q(i) rel_q(i)``; the mean runs
  over every scored query of the subset, so a query without predictions counts 0. A repeated
  prediction keeps its position but can never be relevant again.
* **GAP** (recognition; micro average precision): each query has at most one prediction
  (landmark, confidence). All predictions sorted by confidence descending,
  ``GAP = 1/M sum_i P(i) rel(i)`` where M counts the queries with at least one ground-truth
  landmark; a prediction for a non-landmark query counts as wrong. Ties in confidence are
  broken as Kaggle does: by query id ascending, then landmark id ascending.

:func:`main` turns a GLDv2 index/test subset (GLD layout ``a/b/c/<id>.jpg``) and a solution
into a Revisited-style folder that ``gldboxes retrieval run --dataset`` accepts::

    BENCH/
        gnd_<name>.json    imlist = index ids, qimlist = test ids, gnd[q] = {easy: positives,
                           hard: [], junk: []}: one positive set per query, no junk
        jpg/<id>.jpg       symbolic links to the GLDv2 images
        gldv2.json         task, per-query Usage, recognition labels (format_version 1)
        config.yaml

Positives are restricted to the index subset (m_q counts the relevant images present), and a
retrieval query left without any is dropped. Because the positives are the ``easy`` list, the
Revisited table of ``retrieval run`` shows them as Easy = Medium (full-list mAP) and Hard as
``nan``; the challenge metric comes from :func:`evaluate_benchmark`
(``gldboxes retrieval evaluate --dataset BENCH --ranks ranks.npy``). A recognition benchmark
needs the landmark of every index image (``--labels``: ``id,landmark_id``, e.g.
``index_image_to_landmark.csv`` or ``train.csv``); its positives are the index images of the
query's landmarks, and the prediction of a query is the landmark of its first-ranked image with
that image's score (``scores.npy`` beside ``ranks.npy``).

Modules: :mod:`~retrieval.evaluation.gldv2.metrics` (mAP@k, GAP),
:mod:`~retrieval.evaluation.gldv2.files` (solution, submission, labels CSVs, image lists),
:mod:`~retrieval.evaluation.gldv2.benchmark` (the benchmark folder, :func:`main`, :data:`confs`),
:mod:`~retrieval.evaluation.gldv2.scoring` (scores of a submission or a ranking),
:mod:`~retrieval.evaluation.gldv2.export` (a Revisited folder as a GLDv2 download).
"""

from __future__ import annotations

from retrieval.evaluation.gldv2.benchmark import FORMAT_VERSION, confs, main
from retrieval.evaluation.gldv2.export import export_revisited
from retrieval.evaluation.gldv2.files import (
    GLDv2Solution,
    list_images,
    read_labels,
    read_solution,
    read_submission,
)
from retrieval.evaluation.gldv2.metrics import (
    global_average_precision,
    global_average_precision_loop,
    map_at_k,
    map_at_k_loop,
)
from retrieval.evaluation.gldv2.scoring import (
    SUBSETS,
    Score,
    evaluate_benchmark,
    evaluate_submission,
    format_scores,
    write_submission,
)

__all__ = [
    "FORMAT_VERSION",
    "SUBSETS",
    "GLDv2Solution",
    "Score",
    "confs",
    "evaluate_benchmark",
    "evaluate_submission",
    "export_revisited",
    "format_scores",
    "global_average_precision",
    "global_average_precision_loop",
    "list_images",
    "main",
    "map_at_k",
    "map_at_k_loop",
    "read_labels",
    "read_solution",
    "read_submission",
    "write_submission",
]
