"""GLDv2 benchmarks: mAP@100 and GAP against hand-computed cases and slow references, the
benchmark folder builder, and gldv2 -> run -> evaluate from the command line."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gldboxes.cli.main import main as cli_main
from gldboxes.gld import image_relpath
from retrieval.evaluation.datasets import RevisitedDataset
from retrieval.evaluation.gldv2 import (
    confs,
    evaluate_benchmark,
    evaluate_submission,
    export_revisited,
    global_average_precision,
    global_average_precision_loop,
    list_images,
    main,
    map_at_k,
    map_at_k_loop,
    read_solution,
    read_submission,
    write_submission,
)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jpgs(root: Path, ids: list[str], seed: int = 0) -> None:
    """Tiny random JPEGs in the GLD layout root/a/b/c/<id>.jpg."""
    rng = np.random.default_rng(seed)
    for i in ids:
        p = root / image_relpath(i)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(p)


# ------------------------------------------------------------------------------------ mAP@k
class TestMapAtK:
    def test_hand_computed(self) -> None:
        """Ids: a=0 b=1 c=2 d=3 e=4, x=8 y=9 never relevant.

        q0: positives {a, b, c}, predictions [a, x, b, y]: hits at 1 (P=1) and 3 (P=2/3),
            AP = (1 + 2/3) / 3 = 5/9.
        q1: positives {d}, predictions [x, d]: hit at 2 (P=1/2), AP = 1/2.
        q2: positives {e}, no predictions (a missing query): AP = 0.
        mAP@100 = (5/9 + 1/2 + 0) / 3 = 19/54.
        """
        pred = np.array([[0, 8, 1, 9], [8, 3, -1, -1], [-1, -1, -1, -1]])
        m, ap = map_at_k(pred, [[0, 1, 2], [3], [4]])
        assert ap == pytest.approx([5 / 9, 1 / 2, 0.0], abs=1e-15)
        assert m == pytest.approx(19 / 54, abs=1e-15)

    def test_duplicates_keep_their_position(self) -> None:
        """positives {a, b}, predictions [a, a, b]: a at 1 (P=1), the repeated a at 2 is never
        relevant but takes a slot, b at 3 (P=2/3): AP = (1 + 2/3) / 2 = 5/6 (dropping the
        repeat first would give 1)."""
        m, ap = map_at_k(np.array([[0, 0, 1]]), [[0, 1]])
        assert m == pytest.approx(5 / 6, abs=1e-15) and ap.shape == (1,)
        assert map_at_k_loop([["a", "a", "b"]], [["a", "b"]])[0] == pytest.approx(5 / 6)

    def test_more_than_k_positives(self) -> None:
        """m_q = 150 > 100: the divisor is min(m_q, 100) = 100.

        100 positives in the first 100 ranks: AP = 100 / 100 = 1.
        positives at ranks 2, 4, ..., 100: P = j / 2j = 1/2 at each of the 50 hits,
        AP = 25 / 100 = 1/4.
        """
        pos = np.arange(150)
        alternate = np.where(np.arange(100) % 2 == 1, np.arange(100) // 2, 1000 + np.arange(100))
        m, ap = map_at_k(np.stack([np.arange(100), alternate]), [pos, pos])
        assert ap == pytest.approx([1.0, 0.25], abs=1e-15)
        assert m == pytest.approx(0.625, abs=1e-15)

    def test_cut_at_k(self) -> None:
        """The only positive at rank 101 counts nothing at k=100, 1/101 at k=101; with
        k=1 only the first prediction counts."""
        pred = np.concatenate([1000 + np.arange(100), [7]])[None, :]
        assert map_at_k(pred, [[7]])[0] == 0.0
        assert map_at_k(pred, [[7]], k=101)[0] == pytest.approx(1 / 101)
        assert map_at_k(np.array([[5, 7]]), [[7, 8]], k=1)[0] == 0.0
        assert map_at_k(np.array([[7, 5]]), [[7, 8]], k=1)[0] == 1.0  # 1 / min(2, 1)

    def test_against_reference(self) -> None:
        rng = np.random.default_rng(0)
        for trial in range(30):
            n_q, n_db, width = int(rng.integers(1, 25)), int(rng.integers(5, 300)), 130
            positives = [
                rng.choice(n_db, size=int(rng.integers(1, min(n_db, 150))), replace=False)
                for _ in range(n_q)
            ]
            lengths = rng.integers(0, width + 1, size=n_q)
            rows = [rng.integers(0, n_db, size=n).tolist() for n in lengths]  # with repeats
            pred = np.full((n_q, width), -1)
            for q, r in enumerate(rows):
                pred[q, : len(r)] = r
            k = int(rng.choice([1, 10, 100]))
            fast = map_at_k(pred, positives, k)
            slow = map_at_k_loop(rows, [p.tolist() for p in positives], k)
            np.testing.assert_allclose(fast[1], slow[1], rtol=0, atol=1e-12, err_msg=str(trial))
            assert fast[0] == pytest.approx(slow[0], abs=1e-12)

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="query 1 has no positives"):
            map_at_k(np.zeros((2, 3), int), [[0], []])
        with pytest.raises(ValueError, match="shape"):
            map_at_k(np.zeros((3, 3), int), [[0], [1]])
        with pytest.raises(ValueError, match="k must be >= 1"):
            map_at_k(np.zeros((1, 3), int), [[0]], k=0)
        with pytest.raises(ValueError, match=">= 0"):
            map_at_k(np.array([[-2]]), [[0]])


# --------------------------------------------------------------------------------------- GAP
class TestGAP:
    def test_hand_computed(self) -> None:
        """Queries q1 (gt 1), q2 (gt 2), q3 (non-landmark), q4 (gt 4, no prediction): M = 3.

        Predictions sorted by confidence: q1 -> 1 @0.9 correct (P=1/1), q3 -> 7 @0.8 wrong
        (a non-landmark query), q2 -> 2 @0.5 correct (P=2/3). GAP = (1 + 2/3) / 3 = 5/9.
        """
        ids = ["q1", "q2", "q3", "q4"]
        truth = [[1], [2], [], [4]]
        g = global_average_precision([2, 0, 1], [7, 1, 2], [0.8, 0.9, 0.5], truth, ids)
        assert g == pytest.approx(5 / 9, abs=1e-15)
        ref = global_average_precision_loop(
            {"q1": (1, 0.9), "q2": (2, 0.5), "q3": (7, 0.8)}, dict(zip(ids, truth, strict=True))
        )
        assert ref == pytest.approx(5 / 9, abs=1e-15)

    def test_ties_by_query_id(self) -> None:
        """Equal confidences are ordered by query id ascending (Kaggle's rule), whatever the
        input order: "a" (wrong) before "b" (correct, P=1/2); M = 2: GAP = (1/2) / 2 = 1/4.
        Breaking the tie the other way would give 1/2."""
        truth = [[1], [3]]  # b, a
        for order in ([0, 1], [1, 0]):
            q = np.array([0, 1])[order]
            lm = np.array([1, 9])[order]
            g = global_average_precision(q, lm, [0.5, 0.5], truth, ["b", "a"])
            assert g == pytest.approx(0.25, abs=1e-15)

    def test_against_reference(self) -> None:
        rng = np.random.default_rng(1)
        for _ in range(30):
            n_q = int(rng.integers(1, 40))
            ids = [f"{v:016x}" for v in rng.choice(1 << 40, size=n_q, replace=False)]
            truth = [rng.choice(6, size=int(rng.integers(0, 3)), replace=False) for _ in ids]
            truth[0] = np.array([2])  # M >= 1
            answered = np.flatnonzero(rng.random(n_q) < 0.8)
            lm = rng.integers(0, 6, size=answered.size)
            score = rng.integers(0, 4, size=answered.size) / 4  # many ties
            fast = global_average_precision(answered, lm, score, truth, ids)
            slow = global_average_precision_loop(
                {ids[q]: (int(v), float(s)) for q, v, s in zip(answered, lm, score, strict=True)},
                {i: t.tolist() for i, t in zip(ids, truth, strict=True)},
            )
            assert fast == pytest.approx(slow, abs=1e-12)

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="no query has a ground-truth landmark"):
            global_average_precision([0], [1], [1.0], [[]], ["a"])
        with pytest.raises(ValueError, match="more than one prediction"):
            global_average_precision([0, 0], [1, 2], [1.0, 0.5], [[1]], ["a"])
        with pytest.raises(ValueError, match="finite"):
            global_average_precision([0], [1], [float("nan")], [[1]], ["a"])


# ---------------------------------------------------------------------------- solution files
class TestKaggleFiles:
    def test_organisers_retrieval_case(self, tmp_path: Path) -> None:
        """The metric's published test case (tensorflow/models delf metrics_test), all Public:
        q1 unanswered (0); q2 [x, +] (1/2); q3 [+] with 3 positives (1/3); q4 [+, x] (1).
        mAP@100 = (0 + 1/2 + 1/3 + 1) / 4 = 0.458333; at k=1: (0 + 0 + 1 + 1) / 4 = 0.5.
        An Ignored row is skipped in both files."""
        sol = write_csv(
            tmp_path / "retrieval_solution_v2.1.csv",
            ["id", "images", "Usage"],
            [
                ["0123456789abcdef", "fedcba9876543210 fedcba9876543220", "Public"],
                ["0223456789abcdef", "fedcba9876543210", "Public"],
                [
                    "0323456789abcdef",
                    "fedcba9876543230 fedcba9876543240 fedcba9876543250",
                    "Public",
                ],
                ["0423456789abcdef", "fedcba9876543230", "Public"],
                ["0523456789abcdef", "None", "Ignored"],
            ],
        )
        sub = write_csv(
            tmp_path / "sub.csv",
            ["id", "images"],
            [
                ["0223456789abcdef", "fedcba9876543200 fedcba9876543210"],
                ["0323456789abcdef", "fedcba9876543240"],
                ["0423456789abcdef", "fedcba9876543230 fedcba9876543240"],
                ["0523456789abcdef", "fedcba9876543230"],
            ],
        )
        s = evaluate_submission(sol, sub)
        assert s.metric == "mAP@100"
        assert s.values["Public"] == pytest.approx(0.458333, abs=1e-6)
        assert s.values["all"] == s.values["Public"]
        assert np.isnan(s.values["Private"]) and s.queries == {"Public": 4, "Private": 0, "all": 4}
        assert evaluate_submission(sol, sub, k=1).values["all"] == pytest.approx(0.5)

    def test_organisers_recognition_case(self, tmp_path: Path) -> None:
        """The published GAP case: 5 queries, 2 without landmark (M = 3). Sorted: 150 @15.0 for
        a non-landmark query (wrong), 1 @10.0 (correct, P=1/2), 0 @0.01 (wrong).
        GAP = (1/2) / 3 = 1/6."""
        sol = write_csv(
            tmp_path / "recognition_solution_v2.1.csv",
            ["id", "landmarks", "Usage"],
            [
                ["0123456789abcdef", "0 12", "Public"],
                ["0223456789abcdef", "100 200 300", "Public"],
                ["0323456789abcdef", "1", "Public"],
                ["0423456789abcdef", "", "Public"],
                ["0523456789abcdef", "", "Public"],
                ["0623456789abcdef", "", "Ignored"],
            ],
        )
        sub = write_csv(
            tmp_path / "sub.csv",
            ["id", "landmarks"],
            [
                ["0223456789abcdef", "0 0.01"],
                ["0323456789abcdef", "1 10.0"],
                ["0423456789abcdef", "150 15.0"],
                ["0523456789abcdef", ""],
                ["0623456789abcdef", "5 99"],
            ],
        )
        s = evaluate_submission(sol, sub)
        assert s.metric == "GAP"
        assert s.values["Public"] == pytest.approx(1 / 6, abs=1e-15)

    def test_public_private_all(self, tmp_path: Path) -> None:
        """Public: p1 -> 1 @0.9 correct, p2 -> 5 @0.2 wrong; M=2: GAP = 1/2.
        Private: r1 -> 3 @0.5 correct; r2 non-landmark, no prediction; M=1: GAP = 1.
        all: sorted 0.9 (correct, 1/1), 0.5 (correct, 2/2), 0.2 (wrong); M=3: GAP = 2/3 --
        recomputed on the union, not the mean of the two."""
        sol = write_csv(
            tmp_path / "sol.csv",
            ["id", "landmarks", "Usage"],
            [
                ["p1", "1", "Public"],
                ["p2", "2", "Public"],
                ["r1", "3", "Private"],
                ["r2", "", "Private"],
            ],
        )
        sub = write_csv(
            tmp_path / "sub.csv",
            ["id", "landmarks"],
            [["p1", "1 0.9"], ["p2", "5 0.2"], ["r1", "3 0.5"]],
        )
        s = evaluate_submission(sol, sub)
        assert s.values == pytest.approx({"Public": 0.5, "Private": 1.0, "all": 2 / 3})
        assert s.queries == {"Public": 2, "Private": 2, "all": 4}

    def test_exception(self, tmp_path: Path) -> None:
        sol = write_csv(tmp_path / "sol.csv", ["id", "images", "Usage"], [["q1", "i1", "Public"]])
        bad = [
            (["id", "images"], [["zz", "i1"]], "query id 'zz' is not in sol.csv"),
            (["id", "images"], [["q1", "i1"], ["q1", "i2"]], "sub.csv:3: query id 'q1' is rep"),
            (["id", "landmarks"], [["q1", "1 0.5"]], "header id,images"),
        ]
        for header, rows, msg in bad:
            with pytest.raises(ValueError, match=msg):
                read_submission(write_csv(tmp_path / "sub.csv", header, rows), read_solution(sol))
        for rows, msg in [
            ([["q1", "i1", "Secret"]], "Usage 'Secret'"),
            ([["q1", "None", "Public"]], "Public query 'q1' has no index images"),
            ([["q1", "i1", "Public"], ["q1", "i2", "Private"]], "is repeated"),
        ]:
            with pytest.raises(ValueError, match=msg):
                read_solution(write_csv(tmp_path / "s.csv", ["id", "images", "Usage"], rows))
        with pytest.raises(ValueError, match="header id,images,Usage"):
            read_solution(write_csv(tmp_path / "s.csv", ["id", "x", "Usage"], []))
        rec = write_csv(tmp_path / "r.csv", ["id", "landmarks", "Usage"], [["q1", "1", "Public"]])
        with pytest.raises(ValueError, match="<landmark_id> <confidence>"):
            read_submission(
                write_csv(tmp_path / "sub.csv", ["id", "landmarks"], [["q1", "1"]]),
                read_solution(rec),
            )


# -------------------------------------------------------------------------- benchmark folder
INDEX = [f"{i:03d}aa" for i in range(1, 9)]  # 001aa ... 008aa
TEST = ["t01", "t02", "t03", "t04", "t05"]


@pytest.fixture()
def gld(tmp_path: Path) -> Path:
    """A GLDv2-style download: index/index.csv + index/images, test/images, solutions."""
    write_jpgs(tmp_path / "index" / "images", INDEX)
    write_csv(tmp_path / "index" / "index.csv", ["id"], [[i] for i in INDEX])
    write_jpgs(tmp_path / "test" / "images", TEST, seed=1)
    write_csv(
        tmp_path / "test" / "retrieval_solution_v2.1.csv",
        ["id", "images", "Usage"],
        [
            ["t01", "001aa 002aa", "Public"],
            ["t02", "003aa 999zz", "Private"],  # 999zz: not in the index subset
            ["t03", "None", "Ignored"],
            ["t04", "998zz", "Public"],  # no positive left in the subset: dropped
            ["t09", "004aa", "Private"],  # not among the test images: dropped
            ["t05", "005aa 006aa 007aa", "Private"],
        ],
    )
    write_csv(
        tmp_path / "test" / "recognition_solution_v2.1.csv",
        ["id", "landmarks", "Usage"],
        [
            ["t01", "10", "Public"],
            ["t02", "", "Public"],  # non-landmark query: kept, no positives
            ["t03", "20 30", "Private"],
            ["t04", "", "Ignored"],
            ["t05", "40", "Private"],  # no index image of landmark 40
        ],
    )
    write_csv(
        tmp_path / "index" / "index_image_to_landmark.csv",
        ["id", "landmark_id"],
        [[i, str(lm)] for i, lm in zip(INDEX, [10, 10, 20, 30, 30, 50, 50, 50], strict=True)],
    )
    return tmp_path


class TestBenchmark:
    def test_retrieval_folder(self, gld: Path, tmp_path: Path) -> None:
        bench = tmp_path / "bench"
        out = main(
            confs["all"],
            gld / "index" / "index.csv",
            gld / "test" / "images",
            gld / "test" / "retrieval_solution_v2.1.csv",
            bench,
        )
        ds = RevisitedDataset.load(out)
        assert ds.name.startswith("gldv2-retrieval-all-")
        assert ds.imlist == INDEX and ds.qimlist == ["t01", "t02", "t05"]
        assert [g["easy"] for g in ds.gnd] == [[0, 1], [2], [4, 5, 6]]
        assert all(g["hard"] == [] and g["junk"] == [] for g in ds.gnd)
        assert ds.missing_images() == []
        assert os.path.samefile(ds.image_path("t02"), gld / "test/images/t/0/2/t02.jpg")
        meta = json.loads((out / "gldv2.json").read_text())
        assert meta["query_usage"] == ["Public", "Private", "Private"]
        assert meta["dropped"] == {
            "ignored": 1,
            "no_positive_in_index": 1,
            "not_in_test_images": 1,
            "not_in_usage": 0,
        }
        assert meta["positives_outside_index"] == 2
        assert not list(out.glob("*.pkl"))  # no pickle of ours
        # Done: a second call skips (nothing rewritten); other inputs need overwrite.
        stamp = os.stat(out / "gldv2.json").st_mtime_ns
        main(
            confs["all"],
            gld / "index/index.csv",
            gld / "test/images",
            gld / "test/retrieval_solution_v2.1.csv",
            bench,
        )
        assert os.stat(out / "gldv2.json").st_mtime_ns == stamp
        with pytest.raises(ValueError, match="built from other inputs; use --overwrite"):
            main(
                confs["private"],
                gld / "index/index.csv",
                gld / "test/images",
                gld / "test/retrieval_solution_v2.1.csv",
                bench,
            )
        main(
            confs["private"],
            gld / "index/index.csv",
            gld / "test/images",
            gld / "test/retrieval_solution_v2.1.csv",
            bench,
            overwrite=True,
        )
        assert RevisitedDataset.load(bench).qimlist == ["t02", "t05"]

    def test_retrieval_evaluate(self, gld: Path, tmp_path: Path) -> None:
        """Ranking (8 index images, 3 queries), positives restricted to the subset:
        t01 {0,1} ranked [1, 7, 0, ...]: hits at 1 and 3, AP = (1 + 2/3) / 2 = 5/6 (Public);
        t02 {2}  ranked [5, 2, ...]: AP = 1/2 (Private);
        t05 {4,5,6} ranked [4, 5, 6, ...]: AP = 1 (Private).
        Public 5/6, Private 3/4, all (5/6 + 1/2 + 1) / 3 = 7/9."""
        bench = main(
            confs["all"],
            gld / "index" / "images",
            gld / "test" / "images",
            gld / "test" / "retrieval_solution_v2.1.csv",
            tmp_path / "bench",
        )
        heads = [[1, 7, 0], [5, 2], [4, 5, 6]]
        ranks = np.stack([np.array(h + [i for i in range(8) if i not in h]) for h in heads], axis=1)
        np.save(tmp_path / "ranks.npy", ranks)
        s = evaluate_benchmark(bench, tmp_path / "ranks.npy")
        assert s.values == pytest.approx({"Public": 5 / 6, "Private": 3 / 4, "all": 7 / 9})
        assert s.queries == {"Public": 1, "Private": 2, "all": 3}
        # The Kaggle CSV of the same ranking, scored against the full solution: t02 has 2
        # positives there (999zz is not in the subset): 1/2 / 2 = 1/4; t04 is unanswered (0).
        sub = write_submission(bench, tmp_path / "ranks.npy", tmp_path / "sub.csv")
        full = evaluate_submission(gld / "test" / "retrieval_solution_v2.1.csv", sub)
        assert full.values == pytest.approx(
            {
                "Public": (5 / 6 + 0) / 2,
                "Private": (1 / 4 + 0 + 1) / 3,
                "all": (5 / 6 + 1 / 4 + 1) / 5,
            }
        )

    def test_recognition(self, gld: Path, tmp_path: Path) -> None:
        """Index landmarks 10,10,20,30,30,50,50,50. Queries t01 (10, Public), t02 (none, Public),
        t03 (20 30, Private), t05 (40, Private: no index image but still scored).
        Top-1 predictions: t01 -> image 0 (10) @0.9 correct; t02 -> image 5 (50) @0.8 wrong;
        t03 -> image 3 (30) @0.4 correct; t05 -> image 6 (50) @0.3 wrong.
        Public: M=1: 0.9 correct (1/1), 0.8 wrong: GAP = 1.
        Private: M=2: 0.4 correct (1/1), 0.3 wrong: GAP = 1/2.
        all: M=3: correct (1/1), wrong, correct (2/3), wrong: GAP = (1 + 2/3) / 3 = 5/9."""
        bench = main(
            confs["all"],
            gld / "index" / "images",
            gld / "test" / "images",
            gld / "test" / "recognition_solution_v2.1.csv",
            tmp_path / "bench",
            labels=gld / "index" / "index_image_to_landmark.csv",
        )
        ds = RevisitedDataset.load(bench)
        assert ds.qimlist == ["t01", "t02", "t03", "t05"]
        assert [g["easy"] for g in ds.gnd] == [[0, 1], [], [2, 3, 4], []]
        top = [0, 5, 3, 6]
        ranks = np.stack([np.array([t] + [i for i in range(8) if i != t]) for t in top], axis=1)
        scores = np.zeros(ranks.shape)
        scores[0] = [0.9, 0.8, 0.4, 0.3]
        np.save(tmp_path / "ranks.npy", ranks)
        np.save(tmp_path / "scores.npy", scores)
        s = evaluate_benchmark(bench, tmp_path / "ranks.npy")
        assert s.metric == "GAP"
        assert s.values == pytest.approx({"Public": 1.0, "Private": 0.5, "all": 5 / 9})
        sub = write_submission(bench, tmp_path / "ranks.npy", tmp_path / "sub.csv")
        again = evaluate_submission(gld / "test" / "recognition_solution_v2.1.csv", sub)
        assert again.values == pytest.approx(s.values)

    def test_exception(self, gld: Path, tmp_path: Path) -> None:
        sol = gld / "test" / "retrieval_solution_v2.1.csv"
        with pytest.raises(ValueError, match="recognition solution: give --labels"):
            main(
                confs["all"],
                gld / "index/images",
                gld / "test/images",
                gld / "test/recognition_solution_v2.1.csv",
                tmp_path / "b",
            )
        only_public = write_csv(
            tmp_path / "pub.csv", ["id", "images", "Usage"], [["t01", "001aa", "Public"]]
        )
        with pytest.raises(ValueError, match="no private query of the solution is left"):
            main(
                confs["private"],
                gld / "index/images",
                gld / "test/images",
                only_public,
                tmp_path / "b",
            )
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "mine.txt").write_text("x")
        with pytest.raises(ValueError, match="not a GLDv2 benchmark folder"):
            main(confs["all"], gld / "index/images", gld / "test/images", sol, tmp_path / "busy")
        assert (tmp_path / "busy" / "mine.txt").exists()
        write_csv(gld / "index" / "more.csv", ["id"], [["001aa"], ["abc123"]])
        with pytest.raises(ValueError, match=r"1 of 2 images are missing"):
            list_images(gld / "index" / "more.csv")
        with pytest.raises(FileNotFoundError, match="image folder or CSV not found"):
            list_images(tmp_path / "nope")


class TestExport:
    def test_real_case(self, tmp_path: Path) -> None:
        """A 4-image Revisited folder, 3 queries: q0 (box 2..7 x 1..5.5 -> crop 5 x 5 after
        floor/ceil) with easy {0} hard {2} junk {3}; q1 without box, hard {1}; q2 only junk.
        Medium: q0 -> db0 db2 (Public), q1 -> db1 (Private), q2 -> Ignored.
        Hard: q0 -> db2, q1 -> db1, q2 Ignored."""
        from retrieval.evaluation.datasets import save_gnd

        root = tmp_path / "rev"
        (root / "jpg").mkdir(parents=True)
        names = ["db0", "db1", "db2", "db3", "q_0", "q_1", "q_2"]
        for n in names:
            Image.new("RGB", (10, 8), (40, 80, 120)).save(root / "jpg" / f"{n}.jpg")
        save_gnd(
            {
                "imlist": names[:4],
                "qimlist": names[4:],
                "gnd": [
                    {"bbx": [2.0, 1.0, 6.5, 5.5], "easy": [0], "hard": [2], "junk": [3]},
                    {"easy": [], "hard": [1], "junk": []},
                    {"easy": [], "hard": [], "junk": [0]},
                ],
            },
            root / "gnd_mini.pkl",
        )
        for protocol, expected in (
            ("medium", [["q_0", "db0 db2", "Public"], ["q_1", "db1", "Private"]]),
            ("hard", [["q_0", "db2", "Public"], ["q_1", "db1", "Private"]]),
        ):
            out = export_revisited(root, tmp_path / protocol, protocol=protocol)
            with open(out / "test" / "retrieval_solution_v2.1.csv", newline="") as fh:
                rows = list(csv.reader(fh))
            assert rows == [["id", "images", "Usage"], *expected, ["q_2", "None", "Ignored"]]
        out = tmp_path / "medium"
        assert list(list_images(out / "index" / "index.csv")) == names[:4]
        assert list(list_images(out / "test" / "test.csv")) == names[4:]
        with Image.open(out / "test" / "images" / "q/_/0/q_0.jpg") as im:
            assert im.size == (5, 5)  # columns 2..7, rows 1..6
        with Image.open(out / "test" / "images" / "q/_/1/q_1.jpg") as im:
            assert im.size == (10, 8)
        stamp = os.stat(out / "export.json").st_mtime_ns
        export_revisited(root, out)  # done: skipped
        assert os.stat(out / "export.json").st_mtime_ns == stamp
        with pytest.raises(ValueError, match="not a GLDv2 export"):
            export_revisited(root, tmp_path / "rev")


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gldboxes.synth import confs as synth_confs
    from gldboxes.synth import generate_world

    return generate_world(tmp_path_factory.mktemp("world"), synth_confs["tiny"])


@pytest.mark.slow
def test_cli_end_to_end(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The synthetic world laid out as a GLDv2 download (gldv2-export: a/b/c/<id>.jpg, its
    medium positives as the retrieval solution); gldv2 -> run -> evaluate, and the Kaggle CSV."""
    ds = RevisitedDataset.load(world / "retrieval")
    gld = tmp_path / "gld"
    exp = ["retrieval", "gldv2-export", "--dataset", str(world / "retrieval"), "--out", str(gld)]
    assert cli_main(exp) == 0
    n_q = len(ds.qimlist)
    assert f"{ds.n_db} index images in index/, {n_q} scored queries" in capsys.readouterr().out
    sol = gld / "test" / "retrieval_solution_v2.1.csv"
    with open(sol, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    assert [r[0] for r in rows] == ds.qimlist
    for r, g in zip(rows, ds.gnd, strict=True):  # the medium positives, by name
        assert sorted(r[1].split()) == sorted(ds.imlist[i] for i in g["easy"] + g["hard"])
    with open(sol, "a", newline="") as fh:
        csv.writer(fh).writerow(["00000000deadbeef", "None", "Ignored"])
    rows.append(["00000000deadbeef", "None", "Ignored"])
    bench = tmp_path / "bench"
    args = ["retrieval", "gldv2", "--index", str(gld / "index" / "index.csv")]
    args += ["--test", str(gld / "test" / "images"), "--solution", str(sol), "--out", str(bench)]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert f"{ds.n_db} index images, {n_q} queries ({(n_q + 1) // 2} Public" in text
    assert text.rstrip().endswith("dropped: 1 ignored")

    out = tmp_path / "out"
    run = ["retrieval", "run", "--dataset", str(bench), "--out", str(out), "--kernel", "asmk"]
    run += ["--codebook-size", "128", "--codebook-images", str(world / "train" / "images")]
    assert cli_main(run) == 0
    capsys.readouterr()
    ranks_path = next((out / "results").glob("*/ranks.npy"))
    sub = tmp_path / "submission.csv"
    ev = ["retrieval", "evaluate", "--dataset", str(bench), "--ranks", str(ranks_path)]
    assert cli_main([*ev, "--json", "--write-submission", str(sub)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["metric"] == "mAP@100"
    assert got["all"]["queries"] == n_q

    # Independent check: the ranking by names against the solution, with the slow reference.
    bench_ds = RevisitedDataset.load(bench)
    ranks = np.load(ranks_path)
    names = [[bench_ds.imlist[i] for i in ranks[:, q]] for q in range(n_q)]
    truth = {r[0]: r[1].split() for r in rows[:-1]}
    ref, ap = map_at_k_loop(names, [truth[q] for q in bench_ds.qimlist])
    assert got["all"]["value"] == pytest.approx(ref, abs=1e-12)
    assert got["Public"]["value"] == pytest.approx(float(np.mean(ap[0::2])), abs=1e-12)
    # Far above a random ranking (at most ~ m_q / n_db per query), as retrieval should be.
    assert ref > 0.5, ref

    # The Kaggle submission of the same ranking scores the same against the solution CSV.
    assert (
        cli_main(
            ["retrieval", "evaluate", "--solution", str(sol), "--submission", str(sub), "--json"]
        )
        == 0
    )
    again = json.loads(capsys.readouterr().out)
    assert again == got
    # The table output names the subsets.
    assert cli_main(ev) == 0
    table = capsys.readouterr().out
    assert "| ranking | metric | Public | Private | all |" in table
    assert f"mAP@100 | {100 * got['Public']['value']:.2f}" in table


def test_cli_recognition(gld: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """gldv2 with a recognition solution and --labels, then evaluate --json: the GAP case of
    TestBenchmark.test_recognition through the command line (Public 1, Private 1/2, all 5/9)."""
    bench = tmp_path / "bench"
    args = ["retrieval", "gldv2", "--index", str(gld / "index" / "index.csv"), "--test"]
    args += [str(gld / "test" / "images"), "--out", str(bench), "--name", "rec"]
    args += ["--solution", str(gld / "test" / "recognition_solution_v2.1.csv")]
    assert cli_main(args) == 2
    assert "give --labels" in capsys.readouterr().err
    labels = gld / "index" / "index_image_to_landmark.csv"
    assert cli_main([*args, "--labels", str(labels)]) == 0
    assert capsys.readouterr().out == (
        f"rec: recognition benchmark in {bench}: 8 index images, 4 queries (2 Public, "
        "2 Private); dropped: 1 ignored\n"
    )
    top = [0, 5, 3, 6]
    ranks = np.stack([np.array([t] + [i for i in range(8) if i != t]) for t in top], axis=1)
    scores = np.zeros(ranks.shape)
    scores[0] = [0.9, 0.8, 0.4, 0.3]
    np.save(tmp_path / "ranks.npy", ranks)
    np.save(tmp_path / "scores.npy", scores)
    ev = ["retrieval", "evaluate", "--dataset", str(bench), "--ranks", str(tmp_path / "ranks.npy")]
    assert cli_main([*ev, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["metric"] == "GAP"
    assert [got[s]["value"] for s in ("Public", "Private", "all")] == pytest.approx([1, 0.5, 5 / 9])
    assert [got[s]["queries"] for s in ("Public", "Private", "all")] == [2, 2, 4]


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad GLDv2 inputs exit 2 with a one-line message naming the argument."""
    sol = write_csv(tmp_path / "sol.csv", ["id", "images", "Usage"], [["q1", "i1", "Public"]])
    assert cli_main(["retrieval", "evaluate", "--solution", str(sol)]) == 2
    assert "--solution needs --submission" in capsys.readouterr().err
    args = ["retrieval", "evaluate", "--solution", str(sol), "--submission", str(sol)]
    assert cli_main([*args, "--write-submission", str(tmp_path / "s.csv")]) == 2
    assert "--write-submission: only with --dataset" in capsys.readouterr().err
    assert cli_main(["retrieval", "evaluate", "--dataset", str(tmp_path)]) == 2
    assert "--dataset needs --ranks" in capsys.readouterr().err
    assert cli_main(["retrieval", "evaluate", "--dataset", str(tmp_path), "--ranks", "r.npy"]) == 2
    assert "not a GLDv2 benchmark" in capsys.readouterr().err
    assert cli_main(["retrieval", "evaluate", "--ranks", "r.npy"]) == 2
    assert "--gnd and --ranks are required" in capsys.readouterr().err
    args = ["retrieval", "gldv2", "--index", str(tmp_path / "none"), "--test", str(tmp_path)]
    assert cli_main([*args, "--solution", str(sol), "--out", str(tmp_path / "b")]) == 2
    assert "image folder or CSV not found" in capsys.readouterr().err
