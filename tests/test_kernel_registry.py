"""The kernel registry (retrieval.index.kernels): one object per kernel, every table derived from
it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retrieval.index import aggregation, kernels
from retrieval.index.inverted_file import InvertedFile
from retrieval.index.kernels import Kernel


def test_tables_are_the_methods_definitions() -> None:
    """The derived tables say what the papers say (Tolias et al. 2016; Teichmann et al. 2019)."""
    assert aggregation.KERNELS == (
        "vlad",
        "asmk",
        "asmk_star",
        "r_vlad",
        "r_asmk",
        "r_asmk_star",
        "naive_r_asmk",
        "naive_r_asmk_star",
    )
    assert aggregation.BINARY_KERNELS == {"asmk_star", "r_asmk_star", "naive_r_asmk_star"}
    assert aggregation.REGIONAL_KERNELS == set(aggregation.KERNELS[3:])
    assert aggregation.QUERY_KERNEL == {
        "vlad": "vlad",
        "asmk": "asmk",
        "asmk_star": "asmk_star",
        "r_vlad": "vlad",
        "r_asmk": "asmk",
        "r_asmk_star": "asmk_star",
        "naive_r_asmk": "asmk",
        "naive_r_asmk_star": "asmk_star",
    }
    sim = aggregation.KERNEL_SIMILARITY
    assert sim["vlad"] == sim["r_vlad"] == {"alpha": 1.0, "tau": -math.inf, "normalize": False}
    assert sim["asmk"] == sim["asmk_star"] == {"alpha": 3.0, "tau": 0.0, "normalize": True}
    for name in ("r_asmk", "r_asmk_star", "naive_r_asmk", "naive_r_asmk_star"):
        assert sim[name] == {"alpha": 3.0, "tau": 0.0, "normalize": False}, name
    assert kernels.kernels["naive_r_asmk"].regional == "asmk"
    assert kernels.kernels["r_asmk"].regional == "vlad"
    assert [k.label for k in kernels.kernels.values()][:3] == ["VLAD", "ASMK", "ASMK*"]


def test_cli_and_ablation_read_the_registry() -> None:
    import argparse

    from retrieval import cli
    from retrieval.runner import ablation

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["retrieval", "run", "--dataset", "d", "--out", "o", "--kernel", "x"])
    args = parser.parse_args(
        ["retrieval", "run", "--dataset", "d", "--out", "o", "--kernel", "naive_r_asmk"]
    )
    assert args.kernel == "naive_r_asmk"
    for name, k in kernels.kernels.items():
        assert ablation.METHODS[name] == (k.label, {"kernel": name})


def test_bad_kernels() -> None:
    with pytest.raises(ValueError, match=r"unknown kernel 'asmk\*'.*'naive_r_asmk_star'"):
        kernels.get("asmk*")
    with pytest.raises(ValueError, match="unknown words"):
        Kernel(name="x", label="X", words="hamming", query="x", alpha=3, tau=0, normalize=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="its own query kernel"):
        Kernel(name="x", label="X", words="asmk", query="asmk", alpha=3, tau=0, normalize=True)
    with pytest.raises(ValueError, match="unknown kernel"):
        aggregation.aggregate(np.zeros((1, 8), np.float32), np.eye(8, dtype=np.float32), "svlad")


def test_a_new_kernel_is_one_object(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel added to the registry aggregates and searches with nothing else changed: ASMK*
    with a selectivity threshold tau = 0.5 (a variant the ASMK paper sweeps)."""
    new = Kernel(
        name="asmk_star_t05",
        label="ASMK* (tau 0.5)",
        words="binary",
        query="asmk_star_t05",
        alpha=3.0,
        tau=0.5,
        normalize=True,
    )
    monkeypatch.setitem(kernels.kernels, new.name, new)
    rng = np.random.default_rng(0)
    cb = rng.normal(size=(16, 32)).astype(np.float32)
    db = [rng.normal(size=(40, 32)).astype(np.float32) for _ in range(6)]
    batch = aggregation.aggregate_many(db, cb, new.name)
    ref = aggregation.aggregate_many(db, cb, "asmk_star")
    np.testing.assert_array_equal(batch.data, ref.data)  # same words as ASMK*
    q = [aggregation.aggregate(db[2][:20] + 0.05, cb, new.name)]
    ivf_new = InvertedFile.build(batch, 16, new.name)
    ivf_ref = InvertedFile.build(ref, 16, "asmk_star", tau=0.5)
    s_new = ivf_new.scores(q)[0]
    np.testing.assert_array_equal(s_new, ivf_ref.scores(q)[0])
    assert int(np.argmax(s_new)) == 2
    # and the threshold really differs from ASMK*'s tau = 0
    plain = InvertedFile.build(ref, 16, "asmk_star").scores(q)[0]
    assert not np.array_equal(s_new, plain)
