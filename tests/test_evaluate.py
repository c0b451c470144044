"""The Revisited evaluator against a slow loop transcription of revisitop's reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.evaluation.datasets import load_gnd
from retrieval.evaluation.evaluate import (
    PROTOCOL_RULES,
    PROTOCOLS,
    compute_ap,
    compute_map,
    compute_map_loop,
    evaluate_protocols,
    protocol_gnd,
    protocol_labels,
)

reference_compute_map = compute_map_loop


def _random_gnd(rng: np.random.Generator, n_db: int, nq: int) -> list[dict[str, Any]]:
    gnd = []
    for q in range(nq):
        perm = rng.permutation(n_db)
        n_e, n_h, n_j = (int(v) for v in rng.integers(0, 6, size=3))
        if q == 0:
            n_e = n_h = 0  # a query with no positives at all
        gnd.append(
            {
                "easy": perm[:n_e].tolist(),
                "hard": perm[n_e : n_e + n_h].tolist(),
                "junk": perm[n_e + n_h : n_e + n_h + n_j].tolist(),
            }
        )
    return gnd


class TestComputeMap:
    def test_compute_ap_known_values(self) -> None:
        # Positives at positions 0 and 2 of 2: (1 + 1)/2/2 + (1/2 + 2/3)/2/2.
        assert compute_ap([0, 2], 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
        assert compute_ap([], 3) == 0.0

    @pytest.mark.parametrize("truncate", [None, 1, 7, 20])
    def test_matches_reference_random(self, truncate: int | None) -> None:
        rng = np.random.default_rng(0 if truncate is None else truncate)
        n_db, nq = 40, 25
        gnd = _random_gnd(rng, n_db, nq)
        ranks = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
        if truncate is not None:
            ranks = ranks[:truncate]
        for proto in ("easy", "medium", "hard"):
            g = protocol_gnd(gnd, proto)
            got = compute_map(ranks, g, (1, 5, 10), n_db=n_db)
            ref = reference_compute_map(ranks, g, [1, 5, 10])
            assert got[0] == pytest.approx(ref[0], abs=1e-12)
            np.testing.assert_allclose(got[1], ref[1], atol=1e-12)
            np.testing.assert_allclose(got[2], ref[2], atol=1e-12)
            np.testing.assert_allclose(got[3], ref[3], atol=1e-12)

    def test_perfect_and_worst(self) -> None:
        n_db = 30
        gnd = [{"ok": [3, 7, 11], "junk": [5]}, {"ok": [0], "junk": []}]
        best = np.stack(
            [
                np.r_[[3, 7, 11, 5], np.setdiff1d(np.arange(n_db), [3, 7, 11, 5])],
                np.r_[[0], np.arange(1, n_db)],
            ],
            axis=1,
        )
        m, aps, pr, _ = compute_map(best, gnd, (1, 5))
        assert m == 1.0 and np.all(aps == 1.0) and np.all(pr == 1.0)
        worst = best[::-1]
        m, _, _, _ = compute_map(worst, gnd, (1,))
        assert m < 0.1

    def test_truncated_missing_positive_counts_as_not_found(self) -> None:
        gnd = [{"ok": [1, 2], "junk": []}]
        m, _, _, _ = compute_map(np.array([[1], [0]]), gnd, (1,))
        assert m == pytest.approx(0.5)  # one of two positives found at the top
        m, aps, _, prs = compute_map(np.array([[0], [3]]), gnd, (1, 5))
        assert m == 0.0 and aps[0] == 0.0 and np.all(prs == 0.0)

    def test_junk_is_removed_before_counting(self) -> None:
        gnd = [{"ok": [2], "junk": [0, 1]}]
        m, _, _, _ = compute_map(np.array([[0], [1], [2]]), gnd, (1,))
        assert m == 1.0

    def test_queries_without_positives_left_out(self) -> None:
        gnd = [{"ok": [], "junk": []}, {"ok": [0], "junk": []}]
        m, aps, _, _ = compute_map(np.array([[0, 0], [1, 1]]), gnd, (1,))
        assert m == 1.0 and np.isnan(aps[0])


class TestProtocolRule:
    """The protocol rule is written once (PROTOCOL_RULES): the ok/junk lists the metrics use and
    the per-result labels the FiftyOne view shows come from it and agree."""

    def test_rule_is_the_papers(self) -> None:
        assert PROTOCOL_RULES == {
            "easy": (("easy",), ("junk", "hard")),
            "medium": (("easy", "hard"), ("junk",)),
            "hard": (("hard",), ("junk", "easy")),
        }

    def test_labels_agree_with_protocol_gnd(self) -> None:
        rng = np.random.default_rng(3)
        n_db, nq, k = 40, 9, 40
        gnd = _random_gnd(rng, n_db, nq)
        ids = np.stack([rng.permutation(n_db)[:k] for _ in range(nq)], axis=1)
        for p in PROTOCOLS:
            labels = protocol_labels(gnd, ids, p)
            for q, g in enumerate(protocol_gnd(gnd, p)):
                ok, junk = set(g["ok"].tolist()), set(g["junk"].tolist())
                want = [1 if d in ok else 2 if d in junk else 0 for d in ids[:, q]]
                assert labels[:, q].tolist() == want
            assert (labels == 2).any() or p == "medium"

    def test_unknown_protocol(self) -> None:
        with pytest.raises(ValueError, match="unknown protocol 'medium-hard'"):
            protocol_gnd([{"easy": [], "hard": [], "junk": []}], "medium-hard")  # type: ignore[arg-type]


class TestRanksValidation:
    gnd = [{"ok": [0], "junk": []}, {"ok": [1], "junk": []}]

    def test_wrong_shape(self) -> None:
        with pytest.raises(ValueError, match="transpose"):
            compute_map(np.zeros((5, 2), dtype=int), self.gnd * 2 + [self.gnd[0]], n_db=2)
        with pytest.raises(ValueError, match="2-D"):
            compute_map(np.zeros((2, 2, 2), dtype=int), self.gnd)

    def test_out_of_range_and_negative(self) -> None:
        with pytest.raises(ValueError, match="database has 2 images"):
            compute_map(np.array([[0, 1], [5, 0]]), self.gnd, n_db=2)
        with pytest.raises(ValueError, match="negative"):
            compute_map(np.array([[0, 1], [-1, 0]]), self.gnd)

    def test_duplicates(self) -> None:
        with pytest.raises(ValueError, match="more than once for query 1"):
            compute_map(np.array([[0, 1], [1, 1]]), self.gnd)


class TestRealGroundTruth:
    @pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
    def test_random_rankings_match_reference(self, shared_data: Path, name: str) -> None:
        cfg = load_gnd(shared_data / "revisitop" / f"gnd_{name}.pkl")
        n_db, nq = len(cfg["imlist"]), len(cfg["qimlist"])
        assert nq == 70 and n_db in (4993, 6322)
        rng = np.random.default_rng(1)
        # Biased random ranking: positives tend to come first, so AP is far from 0.
        scores = rng.random((nq, n_db))
        for q, g in enumerate(cfg["gnd"]):
            scores[q, g["easy"] + g["hard"]] += rng.random() * 2
        ranks = np.argsort(-scores, axis=1).T
        for truncate in (None, 100):
            r = ranks if truncate is None else ranks[:truncate]
            for proto in ("easy", "medium", "hard"):
                g = protocol_gnd(cfg["gnd"], proto)
                got = compute_map(r, g, (1, 5, 10), n_db=n_db)
                ref = reference_compute_map(r, g, [1, 5, 10])
                assert got[0] == pytest.approx(ref[0], abs=1e-12)
                np.testing.assert_allclose(got[3], ref[3], atol=1e-12)
        res = evaluate_protocols(ranks, cfg["gnd"], n_db=n_db)
        assert 0.3 < res["medium"].map < 1.0

    def test_perfect_ranking_real(self, shared_data: Path) -> None:
        cfg = load_gnd(shared_data / "revisitop" / "gnd_roxford5k.pkl")
        n_db = len(cfg["imlist"])
        cols = []
        for g in cfg["gnd"]:
            first = np.array(g["easy"] + g["hard"] + g["junk"], dtype=int)
            cols.append(np.r_[first, np.setdiff1d(np.arange(n_db), first)])
        res = evaluate_protocols(np.stack(cols, axis=1), cfg["gnd"], n_db=n_db)
        assert res["medium"].map == pytest.approx(1.0)
        assert res["medium"].mp_at[10] == pytest.approx(1.0)


class TestCli:
    def test_evaluate_json_and_errors(self, tmp_path: Path) -> None:
        from retrieval.evaluation.datasets import save_gnd

        cfg = {
            "imlist": ["a", "b", "c", "d"],
            "qimlist": ["q"],
            "gnd": [{"bbx": [0, 0, 1, 1], "easy": [1], "hard": [2], "junk": [0]}],
        }
        gnd_path = save_gnd(cfg, tmp_path / "gnd_t.pkl")
        np.save(tmp_path / "ranks.npy", np.array([[3], [1], [2], [0]]))
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "gldboxes",
                "retrieval",
                "evaluate",
                "--gnd",
                str(gnd_path),
                "--ranks",
                str(tmp_path / "ranks.npy"),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        res = json.loads(out.stdout)
        # A negative first. Easy: positive 1 at position 1 -> (0 + 1/2) / 2.
        assert res["easy"]["mAP"] == pytest.approx(0.25)
        # Medium: positives at 1 and 2 -> ((0 + 1/2) + (1/2 + 2/3)) / 2 / 2.
        assert res["medium"]["mAP"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 4)
        # Hard: easy 1 becomes junk, so hard 2 moves from position 2 to 1.
        assert res["hard"]["mAP"] == pytest.approx(0.25)
        assert res["medium"]["mP@k"]["1"] == 0.0
        np.save(tmp_path / "bad.npy", np.array([[1], [7], [2], [0]]))
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "gldboxes",
                "retrieval",
                "evaluate",
                "--gnd",
                str(gnd_path),
                "--ranks",
                str(tmp_path / "bad.npy"),
            ],
            capture_output=True,
            text=True,
        )
        assert bad.returncode == 2
        assert "image id 7 but the database has 4 images" in bad.stderr
