"""The landmark-balanced train/val split: vectorised code against a slow reference, and files."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from gldboxes.boxes import read_boxes_csv, read_gld_boxes_csv
from gldboxes.cli.main import main as cli_main
from gldboxes.io import read_json
from gldboxes.split import (
    confs,
    hash_keys,
    long_tail_histogram,
    main,
    read_exclusions,
    read_landmark_csv,
    split_landmarks,
)


def long_tail_data(n_landmarks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,) hex ids and (N,) landmark ids with a long-tailed number of images per landmark."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.zipf(1.7, n_landmarks), 60)
    lms = np.repeat(rng.choice(10**6, n_landmarks, replace=False), sizes)
    ids = np.array([f"{x:016x}" for x in rng.integers(0, 2**63, len(lms))])
    perm = rng.permutation(len(lms))
    return ids[perm], lms[perm]


def reference_split(
    ids: np.ndarray,
    lms: np.ndarray,
    *,
    val_fraction: float,
    train_per: int,
    val_per: int,
    seed: int,
    n_landmarks: int | None = None,
    min_images: int = 1,
    exclude_ids: tuple[str, ...] = (),
    exclude_landmarks: tuple[int, ...] = (),
) -> dict[str, set[str]]:
    """The protocol written as plain loops, one hash call per element."""

    def key(value: Any, stream: int) -> int:
        arr = np.array([value], dtype=object if isinstance(value, str) else np.int64)
        return int(hash_keys(arr, seed, stream)[0])

    by_lm: dict[int, list[str]] = defaultdict(list)
    for i, lm in zip(ids.tolist(), lms.tolist(), strict=True):
        if i not in exclude_ids and lm not in exclude_landmarks:
            by_lm[lm].append(i)
    eligible = [lm for lm, members in by_lm.items() if len(members) >= min_images]
    if n_landmarks is not None:
        eligible = sorted(eligible, key=lambda lm: key(lm, 3))[:n_landmarks]
    out: dict[str, set[str]] = {"train": set(), "val": set(), "val_pool": set(), "kept": set()}
    for lm in eligible:
        members = sorted(by_lm[lm], key=lambda i: key(i, 1))
        u = key(lm, 2) / 2.0**64
        n_val = min(math.floor(val_fraction * len(members) + u), len(members))
        out["kept"].update(members)
        out["val_pool"].update(members[:n_val])
        out["val"].update(members[: min(n_val, val_per)])
        out["train"].update(members[n_val : n_val + train_per])
    return out


def as_sets(ids: np.ndarray, res: Any) -> dict[str, set[str]]:
    return {
        "train": set(ids[res.train]),
        "val": set(ids[res.val]),
        "val_pool": set(ids[res.kept[res.val_pool]]),
        "kept": set(ids[res.kept]),
    }


class TestAgainstReference:
    @pytest.mark.parametrize(
        ("params"),
        [
            {"val_fraction": 0.2, "train_per": 4, "val_per": 4, "seed": 0},
            {"val_fraction": 0.5, "train_per": 2, "val_per": 3, "seed": 7, "min_images": 3},
            {"val_fraction": 0.0, "train_per": 4, "val_per": 4, "seed": 1, "n_landmarks": 40},
            {"val_fraction": 1.0, "train_per": 4, "val_per": 1, "seed": 2},
        ],
    )
    def test_same_selection(self, params: dict[str, Any]) -> None:
        ids, lms = long_tail_data(300, seed=3)
        ex_ids = tuple(ids[:25].tolist())
        ex_lms = tuple(np.unique(lms)[:10].tolist())
        ref = reference_split(ids, lms, exclude_ids=ex_ids, exclude_landmarks=ex_lms, **params)
        res = split_landmarks(
            ids,
            lms,
            val_fraction=params["val_fraction"],
            train_per_landmark=params["train_per"],
            val_per_landmark=params["val_per"],
            seed=params["seed"],
            n_landmarks=params.get("n_landmarks"),
            min_images=params.get("min_images", 1),
            exclude_ids=ex_ids,
            exclude_landmarks=ex_lms,
        )
        got = as_sets(ids, res)
        assert got == ref
        assert len(res.train) == len(got["train"]) and len(res.val) == len(got["val"])
        assert ref["train"] or ref["val"]


class TestProperties:
    def test_protocol_invariants(self) -> None:
        ids, lms = long_tail_data(2000, seed=0)
        res = split_landmarks(ids, lms, val_fraction=0.2, seed=5)
        tr = pd.Series(lms[res.train]).value_counts()
        va = pd.Series(lms[res.val]).value_counts()
        assert tr.max() == 4 and va.max() == 4
        assert not set(res.train) & set(res.val)
        pool_val = set(res.kept[res.val_pool])
        assert set(res.val) <= pool_val and not set(res.train) & pool_val
        # every landmark with >= 2 images appears in training unless all are held out
        counts = pd.Series(lms).value_counts()
        n_val = (
            pd.Series(lms[res.kept[res.val_pool]])
            .value_counts()
            .reindex(counts.index, fill_value=0)
        )
        expected_train = np.minimum(counts - n_val, 4)
        assert (tr.reindex(counts.index, fill_value=0) == expected_train).all()
        assert (va.reindex(counts.index, fill_value=0) == np.minimum(n_val, 4)).all()

    def test_stratified_fraction(self) -> None:
        ids, lms = long_tail_data(3000, seed=1)
        res = split_landmarks(ids, lms, val_fraction=0.3, seed=0)
        assert abs(res.val_pool.mean() - 0.3) < 0.005
        counts = pd.Series(lms).value_counts()
        single = set(counts.index[counts == 1])
        held = pd.Series(lms[res.kept[res.val_pool]])
        share_single = held.isin(single).sum() / len(single)
        # singletons: held out with probability 0.3 each (stochastic rounding), ~1500 of them
        assert abs(share_single - 0.3) < 0.05, share_single
        # per landmark the held-out count is floor(0.3 n) or ceil(0.3 n)
        n_val = held.value_counts().reindex(counts.index, fill_value=0)
        assert ((n_val == np.floor(0.3 * counts)) | (n_val == np.ceil(0.3 * counts))).all()

    def test_deterministic_and_order_free(self) -> None:
        ids, lms = long_tail_data(500, seed=2)
        a = as_sets(ids, split_landmarks(ids, lms, seed=11))
        perm = np.random.default_rng(0).permutation(len(ids))
        b = as_sets(ids[perm], split_landmarks(ids[perm], lms[perm], seed=11))
        assert a == b
        c = as_sets(ids, split_landmarks(ids, lms, seed=12))
        assert c["train"] != a["train"] and c["val_pool"] != a["val_pool"]

    def test_exclusion_leaves_other_landmarks_alone(self) -> None:
        ids, lms = long_tail_data(500, seed=4)
        drop = np.unique(lms)[::7]
        a = split_landmarks(ids, lms, seed=3)
        b = split_landmarks(ids, lms, seed=3, exclude_landmarks=drop.tolist())
        keep_a = ~np.isin(lms[a.train], drop)
        assert set(ids[a.train][keep_a]) == set(ids[b.train])
        assert not np.isin(lms[b.train], drop).any() and not np.isin(lms[b.val], drop).any()
        assert b.stats["landmarks"] == a.stats["landmarks"] - len(drop)

    def test_stats_match_outputs(self) -> None:
        ids, lms = long_tail_data(800, seed=6)
        res = split_landmarks(ids, lms, seed=0, exclude_ids=ids[:10].tolist())
        s = res.stats
        tr = pd.Series(lms[res.train]).value_counts()
        va = pd.Series(lms[res.val]).value_counts()
        both = tr.index.intersection(va.index)
        assert s["input_images"] == len(ids) and s["excluded_images"] == 10
        assert s["train_images"] == len(res.train) and s["val_images"] == len(res.val)
        assert s["train_landmarks"] == len(tr) and s["val_landmarks"] == len(va)
        assert s["landmarks_in_both"] == len(both)
        assert s["landmarks_fully_covered"] == int(((tr[both] == 4) & (va[both] == 4)).sum())
        assert s["val_pool_images"] + s["train_pool_images"] == s["images"] == len(ids) - 10
        tail = s["long_tail"]
        assert sum(b["landmarks"] for b in tail) == s["landmarks"]
        assert sum(b["images"] for b in tail) == s["images"]

    def test_long_tail_bins(self) -> None:
        tail = long_tail_histogram(np.array([1, 1, 2, 3, 4, 5, 8, 9, 1024, 1025, 5000]))
        got = {b["images_per_landmark"]: b["landmarks"] for b in tail if b["landmarks"]}
        assert got == {"1": 2, "2": 1, "3-4": 2, "5-8": 2, "9-16": 1, "513-1024": 1, "1025+": 2}

    def test_bad_arguments(self) -> None:
        ids, lms = np.array(["a", "b"]), np.array([1, 1])
        with pytest.raises(ValueError, match="val_fraction"):
            split_landmarks(ids, lms, val_fraction=1.5)
        with pytest.raises(ValueError, match="same length"):
            split_landmarks(ids, np.array([1]))


class TestFiles:
    def _write_layouts(self, tmp_path: Path) -> list[Path]:
        rows = [("00000000000000a1", 5), ("00000000000000a2", 5), ("00000000000000b1", 9)]
        p1 = tmp_path / "train.csv"
        p1.write_text(
            "id,url,landmark_id\n" + "".join(f"{i},http://x/{i}.jpg,{lm}\n" for i, lm in rows)
        )
        p2 = tmp_path / "kaggle.csv"
        p2.write_text("id,landmark_id\n" + "".join(f"{i},{lm}\n" for i, lm in rows))
        p3 = tmp_path / "train_clean.csv"
        p3.write_text(
            "landmark_id,images\n5,00000000000000a1 00000000000000a2\n9,00000000000000b1\n"
        )
        return [p1, p2, p3]

    def test_three_layouts_agree(self, tmp_path: Path) -> None:
        frames = [
            read_landmark_csv(p).sort_values("id").reset_index(drop=True)
            for p in self._write_layouts(tmp_path)
        ]
        for f in frames[1:]:
            pd.testing.assert_frame_equal(f, frames[0])
        assert frames[0]["landmark_id"].dtype == np.int64

    def test_csv_errors(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.csv"
        bad.write_text("image,label\nx,1\n")
        with pytest.raises(ValueError, match=r"bad\.csv:1: expected columns"):
            read_landmark_csv(bad)
        bad.write_text("id,landmark_id\naaa,1\nbbb,None\nccc,2.5\n")
        with pytest.raises(
            ValueError,
            match=r"bad\.csv:3: landmark_id 'None' is not a non-negative integer "
            r"\(2 bad row\(s\) in the file\)",
        ):
            read_landmark_csv(bad)
        bad.write_text("id,landmark_id\naaa,1\nbbb,2\naaa,3\n")
        with pytest.raises(
            ValueError, match=r"bad\.csv:4: image id 'aaa' listed under two landmarks \(1 and 3\)"
        ):
            read_landmark_csv(bad)
        bad.write_text("id,landmark_id\naaa,1\nbbb,2\naaa,1\n")
        assert len(read_landmark_csv(bad)) == 2

    def test_main_writes_skips_and_cli(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        ids, lms = long_tail_data(400, seed=8)
        csv_path = tmp_path / "train.csv"
        pd.DataFrame({"id": ids, "url": "u", "landmark_id": lms}).to_csv(csv_path, index=False)
        excl = tmp_path / "overlap.csv"
        excl.write_text("landmark_id\n" + "\n".join(str(x) for x in np.unique(lms)[:5]) + "\n")
        conf = {**confs["paper"], "seed": 4, "write_pools": True}
        folder = main(conf, csv_path, tmp_path / "out", exclude=[excl])
        assert folder.name == "split-paper-s4"
        train = pd.read_csv(folder / "train.csv", dtype={"id": str})
        val = pd.read_csv(folder / "val.csv", dtype={"id": str})
        assert list(train.columns) == ["id", "landmark_id"]
        assert train["id"].is_monotonic_increasing
        ref = split_landmarks(ids, lms, seed=4, exclude_landmarks=np.unique(lms)[:5].tolist())
        assert set(train["id"]) == set(ids[ref.train]) and set(val["id"]) == set(ids[ref.val])
        pools = pd.concat([pd.read_csv(folder / f"{s}_pool.csv") for s in ("train", "val")])
        assert len(pools) == ref.stats["images"]
        stats = read_json(folder / "stats.json")
        assert stats["format_version"] == 1 and stats["train_images"] == len(train)
        assert (folder / "config.yaml").exists()
        mtime = (folder / "train.csv").stat().st_mtime_ns
        assert main(conf, csv_path, tmp_path / "out", exclude=[excl]) == folder
        assert (folder / "train.csv").stat().st_mtime_ns == mtime  # skipped: already done
        code = cli_main(
            [
                "-q",
                "split",
                "--csv",
                str(csv_path),
                "--out",
                str(tmp_path / "out"),
                "--seed",
                "4",
                "--exclude",
                str(excl),
                "--write-pools",
            ]
        )
        assert code == 0 and (folder / "train.csv").stat().st_mtime_ns == mtime
        out = capsys.readouterr().out
        assert f"{len(train)} train / {len(val)} val images" in out
        code = cli_main(
            [
                "-q",
                "split",
                "--csv",
                str(csv_path),
                "--out",
                str(tmp_path / "out"),
                "--seed",
                "4",
                "--overwrite",
                "--val-per-landmark",
                "2",
                "--output",
                "v2",
            ]
        )
        assert code == 0
        v2 = pd.read_csv(tmp_path / "out" / "v2-s4" / "val.csv")
        assert v2.groupby("landmark_id").size().max() == 2
        assert (
            cli_main(
                ["-q", "split", "--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out")]
            )
            == 2
        )

    def test_real_gldv2_sample(self, shared_data: Path, tmp_path: Path) -> None:
        path = shared_data / "gld" / "gldv2_kaggle2021_train_sample.csv"
        folder = main({"seed": 0}, path, tmp_path)
        s = read_json(folder / "stats.json")
        assert (s["input_images"], s["landmarks"]) == (30, 4)
        train = pd.read_csv(folder / "train.csv")
        val = pd.read_csv(folder / "val.csv")
        df = read_landmark_csv(path)
        assert set(train["id"]) | set(val["id"]) <= set(df["id"])
        assert train.groupby("landmark_id").size().max() <= 4
        ref = reference_split(
            df["id"].to_numpy(str),
            df["landmark_id"].to_numpy(),
            val_fraction=0.2,
            train_per=4,
            val_per=4,
            seed=0,
        )
        assert set(train["id"]) == ref["train"] and set(val["id"]) == ref["val"]


class TestInputValidation:
    """Every bad row is a ``ValueError`` ``FILE:LINE: what is wrong`` (vectorised checks)."""

    @pytest.mark.parametrize(
        ("rows", "line", "message"),
        [
            ("a,1\nb,3.5\n", 3, "landmark_id '3.5' is not a non-negative integer"),
            (
                "a,1\nb,99999999999999999999999\n",
                3,
                "landmark_id '99999999999999999999999' does not fit a 64-bit integer",
            ),
            ("a,1\nb,9223372036854775808\n", 3, "does not fit a 64-bit integer"),
            ("a,-7\nb,1\n", 2, "landmark_id -7 is negative"),
            ("a,1\nb,\n", 3, "landmark_id '' is missing"),
            ("a,1\nb,x\n", 3, "landmark_id 'x' is not a non-negative integer"),
            ("a,1\n,2\n", 3, "empty image id"),
            ("a,1\n   ,2\n", 3, "empty image id"),
            ("a,1\n../../etc/passwd,2\n", 3, r"image id '\.\./\.\./etc/passwd' is not a safe"),
            ("a,1\nb\\c,2\n", 3, "is not a safe file name"),
            ("a,1\nx..y,2\n", 3, "is not a safe file name"),
            ("a,1\nb\x01,2\n", 3, "holds non-printable characters"),
        ],
    )
    def test_exception(self, tmp_path: Path, rows: str, line: int, message: str) -> None:
        for header in ("id,landmark_id", "id,url,landmark_id"):
            body = rows if header == "id,landmark_id" else _with_url(rows)
            path = tmp_path / "train.csv"
            path.write_text(f"{header}\n{body}", encoding="utf-8")
            with pytest.raises(ValueError, match=rf"train\.csv:{line}: .*{message}"):
                read_landmark_csv(path)

    def test_largest_int64_and_leading_zeros_pass(self, tmp_path: Path) -> None:
        path = tmp_path / "train.csv"
        path.write_text("id,landmark_id\na,9223372036854775807\nb,007\nc,0\n")
        df = read_landmark_csv(path)
        assert df["landmark_id"].tolist() == [2**63 - 1, 7, 0]
        path.write_text("id,landmark_id\ncafé,1\nb,1\n", encoding="utf-8")
        assert read_landmark_csv(path)["id"].tolist() == ["café", "b"]

    def test_no_rows(self, tmp_path: Path) -> None:
        path = tmp_path / "train.csv"
        path.write_text("id,landmark_id\n")
        with pytest.raises(ValueError, match=r"train\.csv:2: no rows"):
            read_landmark_csv(path)
        path.write_text("")
        with pytest.raises(ValueError, match=r"train\.csv:1: empty file"):
            read_landmark_csv(path)
        path.write_text("id,url,landmark_id\n")
        with pytest.raises(ValueError, match=r"train\.csv:2: no rows"):
            main({"seed": 0}, path, tmp_path / "out")

    def test_lines_follow_blank_lines_and_quoted_newlines(self, tmp_path: Path) -> None:
        path = tmp_path / "train.csv"
        path.write_text('id,landmark_id\na,1\n\n"b\nc",2\nd,-3\n')
        with pytest.raises(ValueError, match=r"train\.csv:6: landmark_id -3 is negative"):
            read_landmark_csv(path)

    def test_train_clean_layout(self, tmp_path: Path) -> None:
        path = tmp_path / "train_clean.csv"
        path.write_text("landmark_id,images\n5,a b\n6,c ../d\n")
        with pytest.raises(ValueError, match=r"train_clean\.csv:3: image id '\.\./d'"):
            read_landmark_csv(path)
        path.write_text("landmark_id,images\n5,a b\n6.5,c\n")
        with pytest.raises(ValueError, match=r"train_clean\.csv:3: landmark_id '6\.5'"):
            read_landmark_csv(path)

    def test_exclusion_lists(self, tmp_path: Path) -> None:
        excl = tmp_path / "overlap.csv"
        excl.write_text("landmark_id\n5\n\n-2\n")
        with pytest.raises(ValueError, match=r"overlap\.csv:4: landmark_id '-2'"):
            read_exclusions([excl])

    def test_split_landmarks_rejects_bad_arrays(self) -> None:
        ids = np.array(["a", "b"])
        with pytest.raises(ValueError, match=r"index 1 holds 3\.5"):
            split_landmarks(ids, np.array([1.0, 3.5]))
        with pytest.raises(ValueError, match="index 0 holds -7"):
            split_landmarks(ids, np.array([-7, 1]))
        with pytest.raises(ValueError, match="does not fit a 64-bit integer"):
            split_landmarks(ids, np.array([2**64 - 1, 1], dtype=np.uint64))
        empty = split_landmarks(ids, np.array([1, 2]), exclude_landmarks=[1, 2])
        assert len(empty.train) == len(empty.val) == 0 and empty.stats["landmarks"] == 0

    def test_cli_options(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        csv_path = tmp_path / "train.csv"
        csv_path.write_text("id,landmark_id\na,1\nb,1\n")
        base = ["-q", "split", "--csv", str(csv_path), "--out", str(tmp_path / "out")]
        for extra, message in (
            (["--landmarks", "0"], "--landmarks must be >= 1, got 0"),
            (["--seed", "-1"], "--seed must be >= 0, got -1"),
            (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1], got 1.5"),
            (["--output", "../up"], "--output: folder name '../up' must be one printable"),
        ):
            assert cli_main([*base, *extra]) == 2
            assert message in capsys.readouterr().err
        with pytest.raises(ValueError, match="conf 'output': folder name 'a/b'"):
            main({"output": "a/b"}, csv_path, tmp_path / "out")
        assert not (tmp_path / "out").exists()

    def test_suspect_scan_matches_reference(self) -> None:
        """The byte scan flags every id that the per-id reference rejects (Arrow and object)."""
        from gldboxes.boxes import image_id_problem
        from gldboxes.split import _suspect_ids

        rng = np.random.default_rng(3)
        alphabet = list("ab0./\\ \x01\x7f\u00e9\u2028")
        vals = ["".join(rng.choice(alphabet, rng.integers(0, 5))) for _ in range(5000)]
        ref = np.array([bool(image_id_problem(v)) for v in vals])
        chunked = pd.concat(
            [pd.Series(vals[:2000], dtype="str"), pd.Series(vals[2000:], dtype="str")],
            ignore_index=True,
        )
        for ser in (pd.Series(vals, dtype="str").iloc[0:], chunked, pd.Series(vals, dtype=object)):
            sus = _suspect_ids(ser)
            assert not (ref & ~sus).any()
            assert sus.sum() < len(vals)  # a real filter, not "everything"


def _with_url(rows: str) -> str:
    """Insert a url column after the id of ``id,landmark_id`` rows."""
    out = []
    for row in rows.splitlines():
        i, lm = row.rsplit(",", 1)
        out.append(f"{i},http://x/{len(out)}.jpg,{lm}")
    return "\n".join(out) + "\n"


def test_synthetic_world_end_to_end(tmp_path: Path) -> None:
    from gldboxes.synth import confs as synth_confs
    from gldboxes.synth import generate_world

    conf = replace(
        synth_confs["tiny"],
        size=128,
        texture_size=96,
        landmarks=1,
        easy_per_landmark=1,
        hard_per_landmark=0,
        junk_per_landmark=0,
        distractors=0,
        train_landmarks=8,
        train_per_landmark=6,
    )
    world = generate_world(tmp_path / "world", conf)
    folder = main({"seed": 1, "val_fraction": 0.3}, world / "train" / "train.csv", tmp_path)
    s = read_json(folder / "stats.json")
    assert s["landmarks"] == 8 and s["images"] == 48
    train = pd.read_csv(folder / "train.csv", dtype={"id": str})
    for image_id in train["id"]:
        assert (
            world / "train" / "images" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        ).exists()
    # the world's boxes file is in the official layout: both readers agree on it
    official = read_gld_boxes_csv(world / "train" / "boxes.csv")
    assert official == read_boxes_csv(world / "train" / "boxes.csv")
    assert len(official) == 47
