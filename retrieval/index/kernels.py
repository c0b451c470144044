"""Aggregation kernels as small objects: one :class:`Kernel` per method, in one registry.

A kernel says how the local descriptors of an image (or of each of its regions) become the
per-visual-word vectors of the inverted file, and how two images' words are compared
(Tolias et al., "To aggregate or not to aggregate", IJCV 2016; regional forms from Teichmann
et al., CVPR 2019):

================== =========== ============ ========= ====================================
name               words       regional     query     similarity (alpha, tau, normalise)
================== =========== ============ ========= ====================================
vlad               vlad        -            vlad      dot product (1, -inf, no)
asmk               asmk        -            asmk      selective (3, 0, 1/sqrt(|Wq||Wx|))
asmk_star          binary      -            asmk_star selective on Hamming (3, 0, yes)
r_vlad             vlad        vlad         vlad      dot product
r_asmk             asmk        vlad         asmk      selective, no normalisation
r_asmk_star        binary      vlad         asmk_star selective, no normalisation
naive_r_asmk       asmk        asmk         asmk      selective, no normalisation
naive_r_asmk_star  binary      asmk         asmk_star selective, no normalisation
================== =========== ============ ========= ====================================

``words``: ``vlad`` stores residual sums normalised over the whole image vector, ``asmk`` each
word's residual sum L2-normalised, ``binary`` its sign bits (ASMK*). ``regional``: the per-region
normalisation before the regions' vectors are averaged (``vlad``: the region's VLAD vector as a
whole, R-ASMK; ``asmk``: per word, the naive form). Queries stay one region and use ``query``.

:data:`kernels` lists every kernel; the aggregation, the inverted file, the engine, the CLI's
choices and the ablation's rows read it. A new kernel is one module holding a :class:`Kernel`
named ``KERNEL`` plus its line in :data:`KERNEL_PLUGINS`, when its words are one of the three
forms above.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["KERNEL_PLUGINS", "Kernel", "get", "kernels"]

Words = Literal["vlad", "asmk", "binary"]


@dataclass(frozen=True, kw_only=True)
class Kernel:
    """One aggregation kernel.

    Attributes:
        name: registry key and the name in output folders (``asmk_star``).
        label: the name papers use (``ASMK*``).
        words: stored form of a word: ``vlad``, ``asmk`` (unit residual) or ``binary`` (signs).
        regional: per-region normalisation before averaging (``vlad`` or ``asmk``), or ``None``
            for a single-image kernel.
        query: the single-image kernel its queries use (itself when not regional).
        alpha: selectivity exponent of sigma(u) = sign(u)|u|^alpha.
        tau: selectivity threshold (words with u <= tau contribute 0).
        normalize: divide a score by sqrt(|Wq||Wx|) (the kernel's self-similarity).
    """

    name: str
    label: str
    words: Words
    regional: Literal["vlad", "asmk"] | None = None
    query: str
    alpha: float
    tau: float
    normalize: bool

    def __post_init__(self) -> None:
        if self.words not in ("vlad", "asmk", "binary"):
            raise ValueError(f"kernel {self.name}: unknown words {self.words!r}")
        if self.regional not in (None, "vlad", "asmk"):
            raise ValueError(f"kernel {self.name}: unknown regional {self.regional!r}")
        if self.regional is None and self.query != self.name:
            raise ValueError(f"kernel {self.name}: a single-image kernel is its own query kernel")

    @property
    def binary(self) -> bool:
        """Words stored as packed sign bits."""
        return self.words == "binary"

    @property
    def similarity(self) -> dict[str, Any]:
        """Keyword arguments of :func:`retrieval.index.aggregation.similarity` and the inverted
        file."""
        return {"alpha": self.alpha, "tau": self.tau, "normalize": self.normalize}


def _single(name: str, label: str, words: Words) -> Kernel:
    vlad = words == "vlad"
    return Kernel(
        name=name,
        label=label,
        words=words,
        query=name,
        alpha=1.0 if vlad else 3.0,
        tau=-math.inf if vlad else 0.0,
        normalize=not vlad,
    )


def _regional(name: str, label: str, base: Kernel, per_region: Literal["vlad", "asmk"]) -> Kernel:
    # Regional kernels are compared without the 1/sqrt(|Wq||Wx|) normalisation (Teichmann et
    # al.'s released code); VLAD-type kernels are a plain dot product of normalised vectors.
    return Kernel(
        name=name,
        label=label,
        words=base.words,
        regional=per_region,
        query=base.name,
        alpha=base.alpha,
        tau=base.tau,
        normalize=False,
    )


_VLAD = _single("vlad", "VLAD", "vlad")
_ASMK = _single("asmk", "ASMK", "asmk")
_ASMK_STAR = _single("asmk_star", "ASMK*", "binary")

#: Modules holding one more kernel each (``KERNEL``); listed once here.
KERNEL_PLUGINS: tuple[str, ...] = ()

#: Every kernel by name, in the order the CLI and the tables list them.
kernels: dict[str, Kernel] = {
    k.name: k
    for k in (
        _VLAD,
        _ASMK,
        _ASMK_STAR,
        _regional("r_vlad", "R-VLAD", _VLAD, "vlad"),
        _regional("r_asmk", "R-ASMK", _ASMK, "vlad"),
        _regional("r_asmk_star", "R-ASMK*", _ASMK_STAR, "vlad"),
        _regional("naive_r_asmk", "Naive-R-ASMK", _ASMK, "asmk"),
        _regional("naive_r_asmk_star", "Naive-R-ASMK*", _ASMK_STAR, "asmk"),
    )
}
for _module in KERNEL_PLUGINS:
    _k: Kernel = importlib.import_module(_module).KERNEL
    kernels[_k.name] = _k


def get(name: str) -> Kernel:
    """The kernel called ``name``.

    Raises:
        ValueError: an unknown name (the message lists every kernel).
    """
    try:
        return kernels[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; expected one of {list(kernels)}") from None
