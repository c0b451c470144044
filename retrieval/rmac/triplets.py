"""The triplet ranking loss and hard-triplet mining of learned R-MAC (Gordo et al.).

:func:`triplet_loss` is ``0.5 max(0, m + |a - p|^2 - |a - n|^2)`` (TensorFlow, differentiable);
:func:`mine_triplets` picks triplets from cached descriptors (numpy, vectorised): ``hard``
negatives (Gordo et al.) or ``semihard`` ones (Schroff et al.). Used by
:func:`retrieval.rmac.learned.train`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["mine_triplets", "triplet_loss"]


def triplet_loss(anchor: Any, positive: Any, negative: Any, margin: float = 0.1) -> Any:
    """Mean of ``0.5 max(0, m + |a - p|^2 - |a - n|^2)`` over a batch (tf or numpy (B, D))."""
    import tensorflow as tf

    dp = tf.reduce_sum(tf.square(anchor - positive), axis=-1)
    dn = tf.reduce_sum(tf.square(anchor - negative), axis=-1)
    return tf.reduce_mean(0.5 * tf.nn.relu(margin + dp - dn))


def mine_triplets(
    desc: np.ndarray,
    labels: np.ndarray,
    *,
    n_triplets: int,
    negatives: int,
    margin: float,
    rng: np.random.Generator,
    strategy: str = "hard",
) -> tuple[np.ndarray, np.ndarray]:
    """Hard triplets from cached descriptors (vectorised).

    Each anchor with at least one positive gets a random positive and ``negatives`` images of
    other labels:

    * ``hard`` (Gordo et al.): its most similar negatives; the ``n_triplets`` triplets with the
      largest loss are kept, largest first;
    * ``semihard`` (Schroff et al.): its most similar negatives that are still less similar than
      the positive (inside the margin; the hardest ones when there are none); violating triplets
      are kept in random order. Less prone to collapse from a random network.

    Args:
        desc: (N, D) L2-normalised descriptors. labels: (N,) landmark ids.

    Returns:
        ``(triplets (T, 3) int64 indices into desc, losses (T,))``.
    """
    desc = np.asarray(desc, np.float64)
    labels = np.asarray(labels)
    n = len(desc)
    if n != len(labels):
        raise ValueError(f"mine_triplets: {n} descriptors for {len(labels)} labels")
    sim = desc @ desc.T
    same = labels[:, None] == labels[None, :]
    pos = same & ~np.eye(n, dtype=bool)
    anchors = np.flatnonzero(pos.any(axis=1) & (~same).any(axis=1))
    if anchors.size == 0:
        raise ValueError(
            "mine_triplets: no anchor has both a positive and a negative "
            "(need >= 2 images of a landmark and >= 2 landmarks)"
        )
    r = rng.random((anchors.size, n))
    p = np.argmax(np.where(pos[anchors], r, -1.0), axis=1)  # a random positive
    k = min(negatives, n - 1)
    if strategy not in ("hard", "semihard"):
        raise ValueError(f"mine_triplets: strategy must be 'hard' or 'semihard', got {strategy!r}")
    neg_sim = np.where(same[anchors], -np.inf, sim[anchors])
    if strategy == "semihard":
        s_ap = sim[anchors, p][:, None]
        easier = np.where(neg_sim < s_ap, neg_sim, -np.inf)
        has = np.isfinite(easier).any(axis=1, keepdims=True)
        neg_sim = np.where(has, easier, neg_sim)
    hard = np.argsort(-neg_sim, axis=1, kind="stable")[:, :k]  # most similar negatives
    valid = np.isfinite(np.take_along_axis(neg_sim, hard, axis=1))
    a_rep = np.repeat(anchors, k)
    p_rep = np.repeat(p, k)
    n_flat = hard.ravel()
    keep = valid.ravel()
    a_rep, p_rep, n_flat = a_rep[keep], p_rep[keep], n_flat[keep]
    # unit vectors: |a-p|^2 - |a-n|^2 = 2 s_an - 2 s_ap
    loss = 0.5 * np.maximum(0.0, margin + 2.0 * sim[a_rep, n_flat] - 2.0 * sim[a_rep, p_rep])
    if strategy == "hard":
        order = np.argsort(-loss, kind="stable")[:n_triplets]
    else:  # violating triplets first, in random order
        perm = rng.permutation(loss.size)
        order = perm[np.argsort(loss[perm] <= 0, kind="stable")][:n_triplets]
    return np.stack([a_rep[order], p_rep[order], n_flat[order]], 1).astype(np.int64), loss[order]
