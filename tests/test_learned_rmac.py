"""Tests of retrieval.rmac.learned: head = R-MAC at init, mining, triplet loss, training, I/O,
the describe stage (serial and Ray)."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.evaluation.evaluate import compute_map
from retrieval.features.images import ImageItem
from retrieval.rmac import Whitening, aggregate_rmac, map_descriptors
from retrieval.rmac.learned import (
    LearnedRMAC,
    confs,
    describe_stage,
    load_model,
    main,
    mine_triplets,
    model_files_hash,
    train,
    triplet_loss,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# ----------------------------------------------------------------------------- toy landmarks
def _patch(cls: int, size: int = 40) -> np.ndarray:
    """A class's 'landmark': coloured discs and lines on a coloured square."""
    import cv2

    r = np.random.default_rng(1000 + cls)
    p = np.full((size, size, 3), r.integers(0, 256, 3), np.uint8)
    for _ in range(6):
        c = tuple(int(v) for v in r.integers(0, 256, 3))
        if r.random() < 0.5:
            x, y = r.integers(0, size, 2)
            cv2.circle(p, (int(x), int(y)), int(r.integers(3, 10)), c, -1)
        else:
            x1, y1, x2, y2 = (int(v) for v in r.integers(0, size, 4))
            cv2.line(p, (x1, y1), (x2, y2), c, 2)
    return p


def toy_set(n_classes: int, per_class: int, seed: int, size: int = 80) -> tuple[list, np.ndarray]:
    """Views of each class's patch at a random place, scale and brightness on random clutter.

    Returns:
        (images: list of (size*3/4, size, 3) uint8, labels (N,)).
    """
    import cv2

    r = np.random.default_rng(seed)
    imgs, labels = [], []
    h = size * 3 // 4
    for c in range(n_classes):
        pt = _patch(c)
        for _ in range(per_class):
            im = cv2.GaussianBlur(r.integers(0, 256, (h, size, 3)).astype(np.uint8), (7, 7), 0)
            for _ in range(4):
                col = tuple(int(v) for v in r.integers(0, 256, 3))
                x, y = (int(v) for v in r.integers(0, size, 2))
                dx, dy = (int(v) for v in r.integers(5, 20, 2))
                cv2.rectangle(im, (x, y), (x + dx, y + dy), col, -1)
            s = int(r.integers(28, 44))
            pp = cv2.resize(pt, (s, s)).astype(np.float32) * r.uniform(0.7, 1.3)
            x, y = int(r.integers(0, size - s)), int(r.integers(0, h - s))
            im[y : y + s, x : x + s] = np.clip(pp, 0, 255).astype(np.uint8)
            imgs.append(im)
            labels.append(c)
    return imgs, np.array(labels)


def all_vs_all_map(desc: np.ndarray, labels: np.ndarray) -> float:
    """mAP with every image as a query against all the others (revisitop AP)."""
    n = len(labels)
    sim = desc @ desc.T
    np.fill_diagonal(sim, -np.inf)
    ranks = np.argsort(-sim, axis=1, kind="stable")[:, : n - 1]  # self is last
    gnd = [{"ok": np.flatnonzero((labels == labels[i]) & (np.arange(n) != i))} for i in range(n)]
    return compute_map(ranks.T, gnd)[0]


def _conf(**over: Any) -> dict[str, Any]:
    conf = copy.deepcopy(confs["tiny-cpu"])
    conf["max_side"] = 80
    conf.update(over)
    return conf


# ----------------------------------------------------------------------------- loss + mining
def _mine_loop(
    desc: np.ndarray, labels: np.ndarray, pos: np.ndarray, k: int, margin: float
) -> list[float]:
    """Slow reference of 'hard' mining given each anchor's positive: all (a, p, n) losses."""
    out = []
    n = len(labels)
    for a in range(n):
        if pos[a] < 0:
            continue
        negs = [j for j in range(n) if labels[j] != labels[a]]
        negs.sort(key=lambda j: -float(desc[a] @ desc[j]))
        for j in negs[:k]:
            dp = float(np.sum((desc[a] - desc[pos[a]]) ** 2))
            dn = float(np.sum((desc[a] - desc[j]) ** 2))
            out.append(0.5 * max(0.0, margin + dp - dn))
    return sorted(out, reverse=True)


class TestMining:
    def test_hard_matches_loop_reference(self) -> None:
        rng = np.random.default_rng(0)
        desc = rng.normal(size=(30, 8))
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
        labels = rng.integers(0, 5, 30)
        trip, loss = mine_triplets(
            desc, labels, n_triplets=1000, negatives=4, margin=0.3, rng=np.random.default_rng(1)
        )
        a, p, n = trip.T
        assert np.all(labels[a] == labels[p]) and np.all(a != p)
        assert np.all(labels[a] != labels[n])
        assert np.all(np.diff(loss) <= 0)
        # the positive of each anchor is fixed by the rng: rebuild it and compare all losses
        pos = np.full(30, -1)
        pos[a] = p
        assert len(set(zip(a.tolist(), p.tolist(), strict=True))) == len(set(a.tolist()))
        np.testing.assert_allclose(loss, _mine_loop(desc, labels, pos, 4, 0.3), atol=1e-12)

    def test_semihard_prefers_negatives_inside_the_margin(self) -> None:
        rng = np.random.default_rng(2)
        desc = rng.normal(size=(40, 6))
        desc /= np.linalg.norm(desc, axis=1, keepdims=True)
        labels = rng.integers(0, 4, 40)
        trip, loss = mine_triplets(
            desc,
            labels,
            n_triplets=50,
            negatives=3,
            margin=0.5,
            rng=np.random.default_rng(3),
            strategy="semihard",
        )
        s_ap = np.sum(desc[trip[:, 0]] * desc[trip[:, 1]], 1)
        s_an = np.sum(desc[trip[:, 0]] * desc[trip[:, 2]], 1)
        semi = s_an < s_ap
        assert semi.mean() > 0.8  # the hardest negatives are used only when none is easier
        assert np.all(loss[semi] <= 0.5 * 0.5 + 1e-12)

    def test_triplet_loss_formula(self) -> None:
        rng = np.random.default_rng(4)
        a, p, n = (rng.normal(size=(6, 5)).astype(np.float32) for _ in range(3))
        ref = np.mean(0.5 * np.maximum(0, 0.1 + ((a - p) ** 2).sum(1) - ((a - n) ** 2).sum(1)))
        assert float(triplet_loss(a, p, n, 0.1)) == pytest.approx(ref, rel=1e-5)

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="no anchor"):
            mine_triplets(
                np.eye(3),
                np.array([0, 1, 2]),
                n_triplets=2,
                negatives=1,
                margin=0.1,
                rng=np.random.default_rng(0),
            )
        with pytest.raises(ValueError, match="strategy"):
            mine_triplets(
                np.eye(4),
                np.array([0, 0, 1, 1]),
                n_triplets=2,
                negatives=1,
                margin=0.1,
                rng=np.random.default_rng(0),
                strategy="easy",
            )


# ----------------------------------------------------------------------------- the head
class TestHead:
    def test_untrained_head_is_rmac(self) -> None:
        imgs, _ = toy_set(3, 4, 0)
        imgs.append(imgs[0][:, :50].copy())  # another size and aspect ratio
        model = LearnedRMAC.build(_conf())
        model.init_pca(imgs)
        got = model.describe(imgs)
        wh = Whitening(-model.shift.numpy(), model.fc.numpy().T, np.ones(model.fc.shape[1]))
        for i, im in enumerate(imgs):
            fmap = model.backbone(im)[0]
            _, reg = map_descriptors(fmap, 2)
            np.testing.assert_allclose(got[i], aggregate_rmac(reg, [len(reg)], wh)[0], atol=2e-4)

    def test_box_regions(self) -> None:
        imgs, _ = toy_set(2, 2, 1)
        model = LearnedRMAC.build(_conf(regions="boxes"))
        model.init_pca(imgs)
        whole = model.describe(imgs[:2], [[(0.0, 0.0, 1.0, 1.0)], [(0.0, 0.0, 1.0, 1.0)]])
        grid = model.describe(imgs[:2], [[], []])  # no box: the grid
        np.testing.assert_allclose(grid, model.describe(imgs[:2]), atol=1e-6)
        # one whole-image region: the descriptor is the whitened MAC
        fmap = model.backbone(imgs[0])[0]
        mac = fmap.max(axis=(0, 1))
        v = (mac / np.linalg.norm(mac) + model.shift.numpy()) @ model.fc.numpy()
        np.testing.assert_allclose(whole[0], v / np.linalg.norm(v), atol=2e-4)
        assert not np.allclose(whole[0], grid[0], atol=1e-3)


# ----------------------------------------------------------------------------- training
@pytest.mark.slow
class TestTraining:
    def test_triplet_steps_reduce_loss_and_improve_map(self) -> None:
        train_imgs, train_labels = toy_set(6, 10, 10)
        test_imgs, test_labels = toy_set(6, 6, 100)  # new views of the same landmarks
        untrained = train(_conf(steps=0), train_imgs, train_labels)
        d0 = untrained.describe(train_imgs)
        # a fixed set of violating triplets of the untrained network, to compare losses
        fixed, _ = mine_triplets(
            d0, train_labels, n_triplets=200, negatives=5, margin=0.1, rng=np.random.default_rng(5)
        )

        def fixed_loss(model: LearnedRMAC) -> float:
            d = model.describe(train_imgs)
            return float(triplet_loss(d[fixed[:, 0]], d[fixed[:, 1]], d[fixed[:, 2]], 0.1))

        map0 = all_vs_all_map(untrained.describe(test_imgs), test_labels)
        loss0 = fixed_loss(untrained)
        trained = train(_conf(steps=30), train_imgs, train_labels)
        map1 = all_vs_all_map(trained.describe(test_imgs), test_labels)
        loss1 = fixed_loss(trained)
        assert len(trained.history) == 30
        assert loss1 < 0.7 * loss0, (loss0, loss1)
        assert map1 > map0 + 0.03, (map0, map1)


class TestStage:
    def test_main_save_load_and_skip(self, tmp_path: Path) -> None:
        import cv2

        imgs, labels = toy_set(3, 3, 7)
        root = tmp_path / "train"
        (root / "images").mkdir(parents=True)
        with open(root / "train.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "url", "landmark_id"])
            for i, (im, lab) in enumerate(zip(imgs, labels, strict=True)):
                cv2.imwrite(str(root / "images" / f"{i:04d}.png"), im[..., ::-1])
                w.writerow([f"{i:04d}", f"images/{i:04d}.png", int(lab)])
        with open(root / "no_landmark.csv", "w") as fh:
            fh.write("id,reason\n0008,clutter only\n")
        conf = _conf(steps=2, output="toy")
        folder = main(conf, root / "train.csv", tmp_path / "models")
        meta = json.loads((folder / "model.json").read_text())
        assert meta["format_version"] == 1 and len(meta["history"]) == 2
        assert json.loads((folder / "done.json").read_text())["n_images"] == 8
        model = load_model(folder)
        paths = [root / "images" / "0000.png", root / "images" / "0004.png"]
        again = load_model(folder).describe_paths(paths)
        np.testing.assert_allclose(model.describe_paths(paths), again, atol=1e-6)
        assert again.shape == (2, 64)
        mtime = (folder / "head.npz").stat().st_mtime_ns
        assert main(conf, root / "train.csv", tmp_path / "models") == folder
        assert (folder / "head.npz").stat().st_mtime_ns == mtime

    def test_exception(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            load_model(tmp_path)
        bad = tmp_path / "bad.csv"
        bad.write_text("id,path\n1,a.jpg\n")
        with pytest.raises(ValueError, match="id,url,landmark_id"):
            main(_conf(), bad, tmp_path)
        with pytest.raises(ValueError, match="regions"):
            good = tmp_path / "good.csv"
            good.write_text("id,url,landmark_id\n1,a.jpg,0\n")
            main(_conf(regions="rpn"), good, tmp_path)


# ----------------------------------------------------------------------------- describe stage
N_DB, N_Q = 7, 3
#: Query boxes (x1, y1, x2, y2) in pixels of the 120x90 images, fractional on purpose.
BBXS = [(10.5, 7.25, 90.0, 70.5), (0.0, 0.0, 60.0, 45.0), (33.3, 20.1, 119.0, 89.0)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model (PCA-initialised head), saved as :func:`main` saves one."""
    imgs, _ = toy_set(3, 3, 21)
    model = LearnedRMAC.build(_conf())
    model.init_pca(imgs)
    return model.save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def tiny_revisited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Revisited-style folder: 7 database and 3 query images (120x90, downscaled to 80 by the
    model), each query with a box."""
    import cv2

    from retrieval.evaluation.datasets import save_gnd

    root = tmp_path_factory.mktemp("revisited")
    (root / "jpg").mkdir()
    imgs, labels = toy_set(N_Q + 1, 3, 33, size=120)
    names = [f"db{i}" for i in range(N_DB)] + [f"q{i}" for i in range(N_Q)]
    for name, im in zip(names, imgs, strict=False):
        cv2.imwrite(str(root / "jpg" / f"{name}.jpg"), im[..., ::-1])
    gnd = [
        {
            "bbx": list(BBXS[q]),
            "easy": [i for i in range(N_DB) if labels[i] == labels[N_DB + q]],
            "hard": [],
            "junk": [],
        }
        for q in range(N_Q)
    ]
    save_gnd({"imlist": names[:N_DB], "qimlist": names[N_DB:], "gnd": gnd}, root / "gnd_tiny.pkl")
    return root


def _items(root: Path) -> list[ImageItem]:
    """The database images, then the queries with their boxes (both kinds in one list)."""
    db = [ImageItem(f"db{i}", root / "jpg" / f"db{i}.jpg") for i in range(N_DB)]
    return db + [ImageItem(f"q{i}", root / "jpg" / f"q{i}.jpg", BBXS[i]) for i in range(N_Q)]


class TestDescribeStage:
    def test_serial_shards_equal_describe_paths(
        self, tiny_model: Path, tiny_revisited: Path, tmp_path: Path
    ) -> None:
        from gldboxes.executor import SerialExecutor

        items = _items(tiny_revisited)
        stage, shards = describe_stage(tiny_model, items, shard_size=3)
        assert [len(s.items) for s in shards] == [3, 3, 3, 1]
        assert stage.conf == {
            "model": str(tiny_model.resolve()),
            "files": model_files_hash(tiny_model),
        }
        ex = SerialExecutor(progress=False)
        rep = ex.run(stage, shards, tmp_path / "shards")
        assert rep.counts == {"images": N_DB + N_Q} and len(rep.done) == 4
        got = np.concatenate(
            [np.load(d / "descriptors.npy", allow_pickle=False) for d in rep.shard_dirs(shards)]
        )
        model = load_model(tiny_model)
        want = model.describe_paths([it.path for it in items], [it.bbx for it in items])
        assert got.dtype == np.float32 and got.shape == (N_DB + N_Q, 64)
        assert got.tobytes() == want.tobytes()  # bit for bit the one-process path
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        # the boxes were used: a query's descriptor is not its whole image's
        whole = model.describe_paths([items[N_DB].path])[0]
        assert float(whole @ got[N_DB]) < 0.999
        # resume: finished shards are skipped, a missing one is redone to the same bytes
        shutil.rmtree(rep.shard_dirs(shards)[1])
        again = ex.run(stage, shards, tmp_path / "shards")
        assert again.done == [shards[1].name]
        assert again.skipped == [s.name for s in shards if s.index != 1]
        redone = np.load(again.shard_dirs(shards)[1] / "descriptors.npy", allow_pickle=False)
        assert redone.tobytes() == want[3:6].tobytes()

    def test_stage_conf_follows_the_model_files(self, tiny_model: Path, tmp_path: Path) -> None:
        copy_ = tmp_path / "copy"
        shutil.copytree(tiny_model, copy_)
        assert model_files_hash(copy_) == model_files_hash(tiny_model)
        items = [ImageItem("a", tmp_path / "a.jpg")]
        before = describe_stage(copy_, items, shard_size=1)[0].config_hash
        with np.load(copy_ / "head.npz", allow_pickle=False) as z:
            head = {k: z[k] for k in z.files}
        head["fc"] = head["fc"] * 2  # a "retrained" head
        with open(copy_ / "head.npz", "wb") as fh:
            np.savez(fh, **head)
        assert model_files_hash(copy_) != model_files_hash(tiny_model)
        assert describe_stage(copy_, items, shard_size=1)[0].config_hash != before

    def test_exception(self, tiny_model: Path, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match=r"model\.json not found"):
            describe_stage(tmp_path, [], shard_size=4)
        with pytest.raises(ValueError, match="shard_size"):
            describe_stage(tiny_model, [], shard_size=0)


def _run(dataset: Path, out: Path, model: Path, executor: Any) -> dict[str, bytes]:
    """``run_rmac`` with learned R-MAC, 3 images a shard: the bytes of db.npy and query.npy."""
    from retrieval.rmac import run_rmac
    from retrieval.rmac.stage import resolve_conf

    conf = resolve_conf("tiny-rmac", method="learned-rmac", model=str(model))
    res = run_rmac(dataset, out, conf, executor=executor, shard_size=3)
    assert res.descriptors is not None and (res.descriptors / "descriptors.json").exists()
    assert not list(res.descriptors.glob("*.shards"))  # merged, then removed
    assert res.ranks is not None and np.load(res.ranks).shape == (N_DB, N_Q)
    return {n: (res.descriptors / n).read_bytes() for n in ("db.npy", "query.npy")}


@pytest.fixture(scope="module")
def serial_descriptors(
    tiny_model: Path, tiny_revisited: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, bytes]:
    from gldboxes.executor import SerialExecutor

    out = tmp_path_factory.mktemp("serial")
    return _run(tiny_revisited, out, tiny_model, SerialExecutor(progress=False))


class TestRunRmacLearned:
    def test_serial_run_equals_the_driver_path(
        self, tiny_model: Path, tiny_revisited: Path, serial_descriptors: dict[str, bytes]
    ) -> None:
        import io

        model = load_model(tiny_model)
        items = _items(tiny_revisited)
        db, q = items[:N_DB], items[N_DB:]
        want = {
            "db.npy": model.describe_paths([it.path for it in db]),
            "query.npy": model.describe_paths([it.path for it in q], [it.bbx for it in q]),
        }
        for name, arr in want.items():
            got = np.load(io.BytesIO(serial_descriptors[name]), allow_pickle=False)
            assert got.dtype == np.float32 and got.tobytes() == arr.tobytes(), name

    @pytest.mark.slow
    @pytest.mark.server
    def test_ray_equals_serial(
        self,
        tiny_model: Path,
        tiny_revisited: Path,
        serial_descriptors: dict[str, bytes],
        tmp_path: Path,
    ) -> None:
        import ray  # the `ray` extra: a missing install fails, never skips

        from gldboxes.executor import RayExecutor, Resources, model_loads

        assert ray.__version__
        loads = model_loads()  # this process's model loads: the Ray run adds none
        ray_ex = RayExecutor(
            work_dir=tmp_path / "work",
            num_cpus=2,
            resources=Resources(num_cpus=1),
            progress=False,
        )
        with ray_ex:
            got = _run(tiny_revisited, tmp_path / "ray", tiny_model, ray_ex)
        assert got == serial_descriptors
        assert model_loads() == loads
