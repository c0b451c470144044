"""Sharded retrieval: the sharded inverted file against the single index, and the per-image
stages on a real local Ray (2 CPUs, 0.5 CPU a task) against the serial executor, byte for byte,
over the synthetic world; a worker killed mid-run; downloads from a local server."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fault_server import Fault, FaultServer
from test_executor import gld_files

from gldboxes import executor as ex
from gldboxes import gld_stages
from gldboxes.executor import RayExecutor, Resources, SerialExecutor, Shard, ShardFailedError
from retrieval.index import sharded as sharded_index
from retrieval.index.aggregation import aggregate_many
from retrieval.index.inverted_file import InvertedFile
from retrieval.runner import run as runner
from retrieval.runner import shards as shard_stages


# ==================================================================== sharded index (no Ray)
def _database(kernel: str, n: int = 41, seed: int = 0, cb: Any = None) -> Any:
    """Aggregated random images (D=16) over a 12-word codebook; 3 identical db images."""
    rng = np.random.default_rng(seed)
    d = 16
    cb = rng.standard_normal((12, d)).astype(np.float32) if cb is None else cb
    descs = [rng.standard_normal((int(rng.integers(0, 9)), d)).astype(np.float32) for _ in range(n)]
    descs[3] = np.zeros((0, d), np.float32)  # an image without words scores -1
    if n > 20:
        descs[10] = descs[11].copy()  # exact ties
        descs[20] = descs[11].copy()
    return aggregate_many(descs, cb, kernel), cb


def _reference_merge(ids: list[np.ndarray], scores: list[np.ndarray], k: int) -> np.ndarray:
    """Obviously correct: per query, sort (-(score), id) pairs in Python."""
    out = []
    for q in range(ids[0].shape[0]):
        pairs = sorted(
            (-float(s[q, j]), int(i[q, j]))
            for i, s in zip(ids, scores, strict=True)
            for j in range(i.shape[1])
        )
        out.append([p[1] for p in pairs[:k]])
    return np.array(out, np.int64)


class TestShardedInvertedFile:
    @pytest.mark.parametrize("kernel", ["asmk_star", "asmk", "vlad"])
    def test_same_rankings_as_single_index(self, kernel: str, tmp_path: Path) -> None:
        db, cb = _database(kernel)
        q, _ = _database(kernel, n=6, seed=1, cb=cb)
        single = InvertedFile.build(db, cb.shape[0], kernel)
        parts = sharded_index.ShardedInvertedFile.build(db, cb.shape[0], kernel, part_size=7)
        assert len(parts.parts) == 6 and parts.starts.tolist() == [0, 7, 14, 21, 28, 35]
        np.testing.assert_array_equal(parts.scores(q), single.scores(q))
        for k in (None, 1, 5, 41, 100):
            i1, s1 = single.search(q, k)
            i2, s2 = parts.search(q, k)
            np.testing.assert_array_equal(i2, i1)
            np.testing.assert_array_equal(s2, s1)
        # The tie (images 10, 11, 20 identical) is broken by ascending id across parts.
        full, _ = parts.search(q)
        for row in full:
            pos = [int(np.flatnonzero(row == j)[0]) for j in (10, 11, 20)]
            assert pos == sorted(pos)
        merged = parts.merge()
        for a in ("offsets", "image_ids", "data", "words_per_image"):
            np.testing.assert_array_equal(getattr(merged, a), getattr(single, a))
        parts.save(tmp_path / "ix")
        back = sharded_index.ShardedInvertedFile.load(tmp_path / "ix")
        np.testing.assert_array_equal(back.search(q, 5)[0], single.search(q, 5)[0])
        assert back.stats()["images"] == 41 and back.stats()["parts"] == 6

    @pytest.mark.parametrize("pooling", ["max", "avg"])
    def test_regional_parts_same_as_single_index(self, pooling: str) -> None:
        """D2R regional search: items are regions; each part pools its own images' regions."""
        rng = np.random.default_rng(5)
        d = 16
        cb = rng.standard_normal((12, d)).astype(np.float32)
        images = []
        for _ in range(23):
            x = rng.standard_normal((int(rng.integers(0, 12)), d)).astype(np.float32)
            cuts = rng.integers(0, max(x.shape[0], 1), (int(rng.integers(0, 4)), 2))
            images.append([x] + [x[min(a, b) : max(a, b)] for a, b in cuts])
        images[9] = [images[9][0][:0], images[9][0][:0]]  # regions without words
        flat = [r for regs in images for r in regs]
        owner = np.repeat(np.arange(len(images)), [len(r) for r in images])
        db = aggregate_many(flat, cb, "asmk_star")
        q = aggregate_many(
            [rng.standard_normal((6, d)).astype(np.float32) for _ in range(5)], cb, "asmk_star"
        )
        single = InvertedFile.build(db, 12, "asmk_star", item_image=owner, pooling=pooling)
        parts = sharded_index.ShardedInvertedFile.build(
            db, 12, "asmk_star", 5, item_image=owner, pooling=pooling
        )
        assert parts.starts.tolist() == [0, 5, 10, 15, 20] and parts.n_images == 23
        assert sum(p.n_items for p in parts.parts) == owner.size > 23
        assert all(p.regional and p.pooling == pooling for p in parts.parts)
        np.testing.assert_array_equal(parts.scores(q), single.scores(q))
        for k in (None, 3, 23):
            i1, s1 = single.search(q, k)
            i2, s2 = parts.search(q, k)
            np.testing.assert_array_equal(i2, i1)
            np.testing.assert_array_equal(s2, s1)
        merged = parts.merge()
        for a in ("offsets", "image_ids", "data", "words_per_image", "item_image"):
            np.testing.assert_array_equal(getattr(merged, a), getattr(single, a))
        assert merged.pooling == pooling and parts.stats()["items"] == owner.size

    def test_merge_topk_reference(self) -> None:
        rng = np.random.default_rng(3)
        ids, scs = [], []
        for start, n in ((0, 5), (5, 9), (14, 4)):
            s = rng.integers(0, 4, (7, n)).astype(np.float64)  # many ties
            order = np.lexsort((np.arange(n)[None].repeat(7, 0), -s), axis=-1)
            ids.append(order + start)
            scs.append(np.take_along_axis(s, order, 1))
        for k in (1, 4, 18):
            got, _ = sharded_index.merge_topk(ids, scs, k)
            np.testing.assert_array_equal(got, _reference_merge(ids, scs, k))

    def test_exception(self, tmp_path: Path) -> None:
        db, cb = _database("asmk_star")
        part = InvertedFile.build(db, cb.shape[0], "asmk_star")
        with pytest.raises(ValueError, match="contiguous"):
            sharded_index.ShardedInvertedFile((part, part), np.array([0, 5]))
        with pytest.raises(FileNotFoundError, match=r"sharded\.json"):
            sharded_index.ShardedInvertedFile.load(tmp_path)
        (tmp_path / "sharded.json").write_text('{"format": "other"}')
        with pytest.raises(ValueError, match="not a gldboxes sharded"):
            sharded_index.ShardedInvertedFile.load(tmp_path)
        with pytest.raises(ValueError, match="one \\(ids, scores\\) pair"):
            sharded_index.merge_topk([], [])


# ============================================================================ Ray fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gldboxes.synth import confs, generate_world

    return generate_world(tmp_path_factory.mktemp("world"), confs["tiny"])


@pytest.fixture(scope="module")
def ray_executor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayExecutor]:
    import ray.cloudpickle  # the `ray` extra: a missing install fails, never skips

    # Helper stages defined in this test module travel to the workers by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    r = RayExecutor(
        work_dir=tmp_path_factory.mktemp("raywork"),
        num_cpus=2,
        resources=Resources(num_cpus=0.5),
        progress=False,
    )
    r.start()
    yield r
    r.shutdown()


CONF = {"codebook": {"size": 64, "niter": 10}, "kernel": "asmk_star"}
SHARD = 16


@pytest.fixture(scope="module")
def serial_run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> runner.RunResult:
    return runner.run(
        world / "retrieval",
        tmp_path_factory.mktemp("serial"),
        {**CONF, "verification": {"top_n": 20}},
        executor=SerialExecutor(progress=False),
        shard_size=SHARD,
        codebook_images=world / "train" / "images",
        queries_per_shard=4,
    )


def _files(
    root: Path, skip: tuple[str, ...] = ("done.json", "stage.yaml", "timing.json")
) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.name not in skip
        and "codebooks" not in p.parts  # the Ray run reuses the serial run's codebook
        # nor its codebook's training images (shards, and the merged file k-means reads)
        and not any(x.startswith("images-") and x.endswith((".shards", ".h5")) for x in p.parts)
    }


@pytest.mark.slow
def test_cli_engine_serial(world: Path, serial_run: runner.RunResult, tmp_path: Path) -> None:
    from gldboxes.cli.main import main

    argv = ["-q", "retrieval", "run", "--dataset", str(world / "retrieval"), "--out"]
    argv += [str(tmp_path), "--codebook", str(serial_run.codebook), "--engine", "serial"]
    assert main([*argv, "--shard-size", str(SHARD), "--json"]) == 0
    ranks = list(tmp_path.glob("results/*-k64-*/ranks.npy"))
    assert len(ranks) == 1
    np.testing.assert_array_equal(np.load(ranks[0]), np.load(serial_run.ranks))


# ========================================================================== tests with Ray
@pytest.mark.slow
@pytest.mark.server
class TestRay:
    def test_pipeline_byte_identical_to_serial(
        self, world: Path, serial_run: runner.RunResult, ray_executor: RayExecutor, tmp_path: Path
    ) -> None:
        s_root = serial_run.index.parents[1]
        r = runner.run(
            world / "retrieval",
            tmp_path,
            {**CONF, "verification": {"top_n": 20}},
            executor=ray_executor,
            shard_size=SHARD,
            codebook_path=serial_run.codebook,
            queries_per_shard=4,
        )
        assert r.reports["features-db"].done == ["shard-00000", "shard-00001", "shard-00002"]
        assert r.reports["aggregate"].counts["images"] == 48
        # Every output file (features shards, index parts, per-part top-k, ranks, verified
        # ranks, metrics) has the same bytes; only done.json (timings, pids) differs.
        a, b = _files(s_root), _files(tmp_path)
        assert sorted(a) == sorted(b)
        assert len([k for k in a if k.endswith("features.h5")]) == 4  # 3 db + 1 query
        diff = [k for k in a if a[k] != b[k]]
        assert diff == []
        # Shards ran in Ray workers, not in this process.
        done = ex.read_done(r.reports["features-db"].out_dir / "shard-00000")
        assert done is not None and done["pid"] != os.getpid()
        # Sharded search == the merged single index; the rankings retrieve the landmarks.
        sivf = sharded_index.ShardedInvertedFile.load(r.index)
        ranks = np.load(r.ranks)
        single = sivf.merge()
        from retrieval.features.codebook import load_codebook
        from retrieval.runner.conf import resolve_conf

        qnames = r.query_features.all_names
        q = runner.aggregate_named(
            resolve_conf(CONF), r.query_features, qnames, load_codebook(r.codebook)
        )
        np.testing.assert_array_equal(single.search(q)[0].T, ranks)
        assert r.results["easy"].map > 0.9

    def test_kill_worker_then_rerun(
        self,
        world: Path,
        serial_run: runner.RunResult,
        ray_executor: RayExecutor,
        tmp_path: Path,
    ) -> None:
        from retrieval.evaluation.datasets import RevisitedDataset
        from retrieval.features import ImageItem
        from retrieval.runner.conf import feature_conf, resolve_conf

        ds = RevisitedDataset.load(world / "retrieval")
        fc = feature_conf(resolve_conf(CONF))
        items = [ImageItem(n, ds.image_path(n)) for n in ds.imlist]
        stage, shards = shard_stages.feature_stage(fc, items, shard_size=SHARD)
        crash = functools.partial(
            _crash_once, inner=stage.fn, marks=str(tmp_path / "marks"), victim="shard-00001"
        )
        out = tmp_path / "feats"
        # 1. The worker running shard 1 dies (os._exit) and retries are off: that shard fails,
        #    the others finish.
        with pytest.raises(ShardFailedError, match="shard-00001") as info:
            ray_executor.run(dataclasses.replace(stage, fn=crash, retries=0), shards, out)
        assert "shard-00001" in info.value.failed
        assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000", "shard-00002"]
        assert not list(out.glob(".*"))  # the dead attempt's temp folder was cleaned
        # 2. The rerun redoes only that shard.
        rep = ray_executor.run(stage, shards, out)
        assert rep.done == ["shard-00001"] and rep.skipped == ["shard-00000", "shard-00002"]
        self._same_as_serial(out, serial_run, shards)
        # 3. With retries, Ray resubmits the dead worker's task within the same run.
        (tmp_path / "marks").joinpath("shard-00001").unlink()
        out2 = tmp_path / "feats2"
        rep2 = ray_executor.run(dataclasses.replace(stage, fn=crash, retries=1), shards, out2)
        assert rep2.ok and len(rep2.done) == 3
        assert (tmp_path / "marks" / "shard-00001").exists()  # the crash did happen
        self._same_as_serial(out2, serial_run, shards)

    @staticmethod
    def _same_as_serial(out: Path, serial_run: runner.RunResult, shards: list[Shard]) -> None:
        import h5py

        names = []
        for s in shards:
            with h5py.File(out / s.name / "features.h5", "r") as f:
                names += list(f.keys())
        assert sorted(names) == sorted(serial_run.db_features.all_names)  # none lost or twice
        for s, ref in zip(shards, serial_run.db_features.paths, strict=True):
            assert (out / s.name / "features.h5").read_bytes() == ref.read_bytes()

    def test_model_loaded_once_per_worker(self, ray_executor: RayExecutor, tmp_path: Path) -> None:
        stage = ex.Stage(
            "pids",
            _report_pid,
            conf={"t": str(tmp_path)},
            load_model=functools.partial(_load_pid_model, str(tmp_path / "loads")),
        )
        rep = ray_executor.run(stage, ex.make_shards(list(range(24)), 1), tmp_path / "o")
        assert len(rep.done) == 24
        loads = sorted(p.name for p in (tmp_path / "loads").iterdir())
        pids = {(tmp_path / "o" / s / "pid.txt").read_text() for s in rep.done}
        # One load per worker process that ran shards, reused for all its shards.
        assert sorted(loads) == sorted(pids) and len(loads) < 24

    def test_downloads_on_ray_match_serial(self, ray_executor: RayExecutor, tmp_path: Path) -> None:
        import cv2

        files, images = gld_files(n_tars=3)
        img = np.full((30, 50, 3), 90, np.uint8)
        cv2.circle(img, (20, 15), 9, (255, 0, 0), -1)
        files.update({f"img/{i}.jpg": cv2.imencode(".jpg", img)[1].tobytes() for i in range(5)})
        trees = {}
        with FaultServer(files) as srv:
            srv.add_fault("train/images_001.tar", Fault(drop_after=900, times=2))
            csv_path = tmp_path / "urls.csv"
            csv_path.write_text(
                "id,url\n" + "".join(f"{i:016x},{srv.url(f'img/{i}.jpg')}\n" for i in range(6))
            )
            for name, engine in (("serial", SerialExecutor(progress=False)), ("ray", ray_executor)):
                root = tmp_path / name
                stage, shards = gld_stages.gldv2_shard_stage(
                    "train", root / "gld", [0, 1, 2], base_url=srv.base_url, backoff=0.01
                )
                rep = engine.run(stage, shards, root / "gld" / "shards")
                assert rep.counts["images"] == 9
                stage, shards = gld_stages.url_list_stage(
                    csv_path, root / "urls", rows_per_shard=2, retries=0
                )
                rep = engine.run(stage, shards, root / "urls" / "shards")
                assert rep.counts["downloaded"] == 5 and rep.counts["failed"] == 1
                trees[name] = _files(root)
        assert sorted(trees["serial"]) == sorted(trees["ray"])
        assert trees["serial"] == trees["ray"]
        got = {
            k.removeprefix("gld/images/"): v
            for k, v in trees["ray"].items()
            if k.startswith("gld/images/")
        }
        assert got == images


# ================================================================ index-side regions (D2R)
REGIONAL = {
    "r_asmk_star": {**CONF, "kernel": "r_asmk_star", "regions": "gt"},
    "d2r_max": {**CONF, "regions": "gt", "regional_search": "max", "region_features": "reextract"},
}


@pytest.fixture(scope="module")
def regional_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One output folder per way of running, shared by the confs (features are reused)."""
    return {k: tmp_path_factory.mktemp(f"regional-{k}") for k in ("engine", "serial", "ray")}


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.parametrize("kind", sorted(REGIONAL))
def test_regional_parts_equal_one_index(
    kind: str,
    world: Path,
    serial_run: runner.RunResult,
    ray_executor: RayExecutor,
    regional_dirs: dict[str, Path],
) -> None:
    """Regional kernels and regional search in 3 parts (serial and Ray) == one index part: the
    same ranks and metrics, and the parts merged are the single index, array for array."""
    import json

    from retrieval.regions import read_regions_csv
    from retrieval.runner.run import run as one_part_run

    conf = REGIONAL[kind]
    # the reference: one index part (a shard size above the database)
    ref = one_part_run(
        world / "retrieval",
        regional_dirs["engine"],
        conf,
        codebook_path=serial_run.codebook,
        shard_size=10_000,
    )
    runs = {
        name: runner.run(
            world / "retrieval",
            regional_dirs[name],
            conf,
            executor=engine,
            shard_size=SHARD,
            codebook_path=serial_run.codebook,
        )
        for name, engine in (("serial", SerialExecutor(progress=False)), ("ray", ray_executor))
    }
    assert ref.regions is not None
    n_regions = sum(len(b) for b in read_regions_csv(ref.regions).values())
    want_items = n_regions if kind == "d2r_max" else 48
    assert n_regions > 48 and ref.index_stats["items"] == want_items
    for name, r in runs.items():
        assert r.index.name == ref.index.name, name
        assert r.regions is not None and r.regions.read_bytes() == ref.regions.read_bytes()
        assert r.reports["aggregate"].counts["images"] == 48
        assert r.reports["aggregate"].counts["items"] == want_items
        # The very ranking and metrics of the single-machine engine.
        np.testing.assert_array_equal(np.load(r.ranks), np.load(ref.ranks), err_msg=name)
        assert json.loads(r.metrics_path.read_text()) == json.loads(ref.metrics_path.read_text())
        for p in ("easy", "medium", "hard"):
            assert r.results[p].as_dict() == ref.results[p].as_dict()
        # The parts merged into one index are the one-part index, array for array (regional
        # search: postings of items shifted by the parts before, item_image made global).
        sivf = sharded_index.ShardedInvertedFile.load(r.index)
        assert len(sivf.parts) == 3 and sivf.parts[0].pooling == conf.get("regional_search")
        merged, single = sivf.merge(), InvertedFile.load(ref.index / "part-00000" / "index")
        for a in ("offsets", "image_ids", "data", "words_per_image", "item_image"):
            np.testing.assert_array_equal(getattr(merged, a), getattr(single, a), err_msg=a)
    if kind == "d2r_max":
        # reextract: every crop extracted once, in shards paired with the images' shards
        crops = runs["ray"].reports["features-regions"]
        assert crops.counts["images"] == n_regions - 48 and len(crops.done) == 3
    assert runs["serial"].results["medium"].map > 0.5
    # Ray's files are the serial executor's, byte for byte.
    a, b = _files(regional_dirs["serial"]), _files(regional_dirs["ray"])
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []


# ------------------------------------------------------------- stages shipped to Ray workers
def _crash_once(shard: Shard, out: Path, model: Any, *, inner: Any, marks: str, victim: str) -> Any:
    """Kill the worker process the first time ``victim`` runs (no cleanup, like an OOM kill)."""
    mark = Path(marks) / victim
    if shard.name == victim and not mark.exists():
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
        os._exit(1)
    return inner(shard, out, model)


def _load_pid_model(folder: str) -> int:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / str(os.getpid())).touch()
    return os.getpid()


def _report_pid(shard: Shard, out: Path, model: Any) -> dict[str, int]:
    assert model == os.getpid()  # the cached model was loaded in this very process
    (out / "pid.txt").write_text(str(os.getpid()))
    return {"n": 1}


@pytest.mark.slow
@pytest.mark.server
def test_codebook_sets_under_both_engines(
    world: Path, ray_executor: RayExecutor, tmp_path: Path
) -> None:
    """``--codebook-dataset`` (the protocol's other dataset) and several pooled
    ``--codebook-images`` folders work under ``--engine serial`` and ``--engine ray``: the
    training set is extracted in shards, and the codebook and the ranking are those of a
    one-shard run, byte for byte."""
    from gldboxes.cli.main import main
    from gldboxes.synth import confs, generate_world
    from retrieval.runner.run import run as one_part_run

    other_world = generate_world(tmp_path / "w2", dataclasses.replace(confs["tiny"], seed=7))
    other = tmp_path / "other"  # a second benchmark with a name of its own, like rparis6k
    shutil.copytree(other_world / "retrieval", other)
    (other / "gnd_synth.pkl").rename(other / "gnd_other.pkl")
    ref = one_part_run(
        world / "retrieval", tmp_path / "engine", CONF, codebook_dataset=other, shard_size=10_000
    )
    assert ref.codebook.parent.name.endswith("-other")
    for name, engine in (("serial", SerialExecutor(progress=False)), ("ray", ray_executor)):
        r = runner.run(
            world / "retrieval",
            tmp_path / name,
            CONF,
            executor=engine,
            shard_size=SHARD,
            codebook_dataset=other,
        )
        assert r.codebook.parent.name == ref.codebook.parent.name, name
        assert r.codebook.read_bytes() == ref.codebook.read_bytes(), name
        np.testing.assert_array_equal(np.load(r.ranks), np.load(ref.ranks), err_msg=name)
        assert r.reports["features-train-0"].counts["images"] == 48
    # Two folders pooled, through the CLI as the README's protocol examples give them.
    folders = [str(world / "train" / "images"), str(other_world / "train" / "images")]
    conf = {"codebook": {"size": 64}, "kernel": "asmk_star"}  # the CLI's k-means defaults
    ref2 = one_part_run(
        world / "retrieval", tmp_path / "engine2", conf, codebook_images=folders, shard_size=10_000
    )
    out = tmp_path / "cli"
    argv = ["-q", "retrieval", "run", "--dataset", str(world / "retrieval"), "--out", str(out)]
    argv += ["--codebook-size", "64", "--engine", "serial", "--shard-size", str(SHARD)]
    assert main([*argv, "--codebook-images", *folders]) == 0
    (cb,) = out.glob("codebooks/*/codebook.npy")
    assert cb.parent.name == ref2.codebook.parent.name and "+1-" in cb.parent.name
    assert cb.read_bytes() == ref2.codebook.read_bytes()
    (ranks,) = out.glob("results/*/ranks.npy")
    np.testing.assert_array_equal(np.load(ranks), np.load(ref2.ranks))
