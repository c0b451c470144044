"""Local features: RootSIFT, crops, resizing, bad images, resumable HDF5, DELF SavedModels."""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import pytest
from PIL import Image

import retrieval.features as F
from retrieval.features import (
    ImageItem,
    check_features,
    confs,
    extract_image,
    failures,
    load_image,
    main,
    read_descriptors,
    read_features,
    rootsift,
)
from retrieval.features.delf import DELF_SCALES, read_datum


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A gray image full of corners and blobs (SIFT finds hundreds of keypoints)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 128, np.uint8)
    for _ in range(h * w // 800):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        c = int(rng.integers(0, 256))
        if rng.random() < 0.5:
            cv2.rectangle(
                img, (x, y), (x + int(rng.integers(4, 30)), y + int(rng.integers(4, 30))), c, -1
            )
        else:
            cv2.circle(img, (x, y), int(rng.integers(3, 15)), c, -1)
    return img


def conf(**pre: Any) -> dict[str, Any]:
    c = copy.deepcopy(confs["rootsift"])
    c["preprocessing"].update(pre)
    return c


def save(path: Path, arr: np.ndarray, **kw: Any) -> Path:
    Image.fromarray(arr).save(path, **kw)
    return path


class TestRootSift:
    def test_reference(self) -> None:
        d = np.random.default_rng(0).uniform(0, 200, (20, 128)).astype(np.float32)
        ref = np.sqrt(d / d.sum(axis=1, keepdims=True))
        np.testing.assert_allclose(rootsift(d), ref, rtol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(rootsift(d), axis=1), 1.0, rtol=1e-5)
        assert np.all(np.isfinite(rootsift(np.zeros((2, 128), np.float32))))

    def test_real_case(self, tmp_path: Path) -> None:
        img = texture(300, 400)
        p = save(tmp_path / "a.png", img)
        c = conf()
        c["model"]["max_features"] = 150
        ex = F.make_extractor(c)
        feats, size = extract_image(ex, ImageItem("a", p), c)
        n = feats.descriptors.shape[0]
        assert size == (400, 300) and 50 <= n <= 150
        assert feats.descriptors.shape == (n, 128) and feats.keypoints.shape == (n, 2)
        np.testing.assert_allclose(np.linalg.norm(feats.descriptors, axis=1), 1.0, rtol=1e-5)
        assert np.all(np.diff(feats.scores) <= 0)  # strongest first
        kp = feats.keypoints
        assert kp[:, 0].min() >= 0 and kp[:, 0].max() < 400 and kp[:, 1].max() < 300
        # same as running OpenCV SIFT ourselves
        sift = cv2.SIFT_create(nfeatures=150)  # type: ignore[attr-defined]
        kps, desc = sift.detectAndCompute(img, None)
        order = np.argsort(-np.array([k.response for k in kps]), kind="stable")[:150]
        np.testing.assert_allclose(feats.descriptors, rootsift(desc[order]), rtol=1e-6)


class TestGeometry:
    def test_crop_equals_precropped_image_shifted(self, tmp_path: Path) -> None:
        img = texture(240, 320, seed=1)
        full = save(tmp_path / "full.png", img)
        crop = save(tmp_path / "crop.png", img[30:190, 40:240])
        c = conf()
        ex = F.make_extractor(c)
        a, _ = extract_image(ex, ImageItem("q", full, (40.0, 30.0, 240.0, 190.0)), c)
        b, _ = extract_image(ex, ImageItem("c", crop), c)
        assert a.descriptors.shape[0] > 20
        np.testing.assert_allclose(a.keypoints, b.keypoints + np.array([40.0, 30.0]), atol=1e-4)
        np.testing.assert_array_equal(a.descriptors, b.descriptors)
        assert a.keypoints[:, 0].min() >= 40 and a.keypoints[:, 1].max() <= 190

    def test_downscaled_keypoints_in_original_pixels(self, tmp_path: Path) -> None:
        img = texture(400, 600, seed=2)
        big = save(tmp_path / "big.png", img)
        small = save(
            tmp_path / "small.png", cv2.resize(img, (300, 200), interpolation=cv2.INTER_AREA)
        )
        c = conf(max_side=300)
        ex = F.make_extractor(c)
        a, size = extract_image(ex, ImageItem("b", big), c)
        b, _ = extract_image(ex, ImageItem("s", small), c)
        assert size == (600, 400)
        np.testing.assert_allclose(a.keypoints, b.keypoints * 2.0, atol=1e-3)
        np.testing.assert_allclose(a.scales, b.scales * 2.0, rtol=1e-5)


class TestBadImages:
    def test_decoding(self, tmp_path: Path) -> None:
        rgb = np.stack([texture(120, 160, s) for s in (3, 4, 5)], axis=2)
        Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
        arr, size, _ = load_image(tmp_path / "cmyk.jpg", grayscale=False)
        assert arr.shape == (120, 160, 3) and size == (160, 120)
        assert np.abs(arr.astype(int) - rgb).mean() < 12  # colours survive CMYK

        rgba = np.dstack([rgb, np.zeros((120, 160), np.uint8)])  # fully transparent
        save(tmp_path / "alpha.png", rgba)
        arr, _, _ = load_image(tmp_path / "alpha.png", grayscale=False)
        assert np.all(arr == 255)  # composited on white, not on the hidden RGB

        g16 = texture(50, 70).astype(np.uint16) * 256
        Image.fromarray(g16).save(tmp_path / "g16.png")
        arr, _, _ = load_image(tmp_path / "g16.png")
        assert arr.dtype == np.uint8 and arr.max() == 255

    def test_exif_rotation(self, tmp_path: Path) -> None:
        stored = texture(100, 160, seed=6)
        exif = Image.Exif()
        exif[0x0112] = 6  # display rotated 90 degrees clockwise
        Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=95)
        up, size, _ = load_image(tmp_path / "rot.jpg")
        raw, _, _ = load_image(tmp_path / "rot.jpg", exif_transpose=False)
        assert size == (100, 160) and up.shape == (160, 100)
        np.testing.assert_array_equal(up, np.rot90(raw, k=-1))

    def test_huge_jpeg_decoded_reduced(self, tmp_path: Path) -> None:
        big = cv2.resize(texture(300, 400, seed=7), (4000, 3000), interpolation=cv2.INTER_NEAREST)
        save(tmp_path / "huge.jpg", big, quality=80)
        arr, size, factor = load_image(tmp_path / "huge.jpg", max_side=500)
        assert size == (4000, 3000) and factor == 4.0 and arr.shape == (750, 1000)
        c = conf(max_side=500)
        feats, _ = extract_image(F.make_extractor(c), ImageItem("h", tmp_path / "huge.jpg"), c)
        assert feats.descriptors.shape[0] > 50
        assert feats.keypoints[:, 0].max() < 4000 and feats.keypoints[:, 0].max() > 2000

    def test_main_records_errors_and_empties(self, tmp_path: Path) -> None:
        good = save(tmp_path / "good.jpg", texture(120, 160), quality=90)
        data = good.read_bytes()
        (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
        (tmp_path / "corrupt.jpg").write_bytes(os.urandom(300))
        save(tmp_path / "tiny.png", np.full((4, 4), 7, np.uint8))
        save(tmp_path / "flat.png", np.full((64, 64), 7, np.uint8))
        items = [
            ImageItem(n, tmp_path / f)
            for n, f in [
                ("good", "good.jpg"),
                ("trunc", "trunc.jpg"),
                ("corrupt", "corrupt.jpg"),
                ("tiny", "tiny.png"),
                ("flat", "flat.png"),
                ("missing", "nope.jpg"),
            ]
        ]
        out = main(conf(), items, tmp_path / "f.h5")
        bad = failures(out)
        assert set(bad) == {"trunc", "corrupt", "missing"}
        assert "trunc.jpg" in bad["trunc"] and "corrupt.jpg" in bad["corrupt"]
        with h5py.File(out, "r") as f:
            assert f["good"].attrs["status"] == "ok"
            assert f["tiny"].attrs["status"] == "empty"
            assert f["flat"].attrs["status"] == "empty"
            assert f["corrupt"]["descriptors"].shape == (0, 128)
        assert read_features(out, "good").descriptors.shape[0] > 20


class TestMain:
    def test_resumable_and_skips(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        paths = [save(tmp_path / f"{i}.png", texture(80, 100, seed=i)) for i in range(4)]
        items = [ImageItem(f"im{i}", p) for i, p in enumerate(paths)]
        calls: list[str] = []
        real = F.extract_image

        def counting(ex: Any, item: ImageItem, c: Any) -> Any:
            calls.append(item.name)
            return real(ex, item, c)

        monkeypatch.setattr(F, "extract_image", counting)
        out = main(conf(), items[:3], tmp_path / "f.h5")
        assert calls == ["im0", "im1", "im2"]
        main(conf(), items[:3], out)
        assert calls == ["im0", "im1", "im2"]  # complete: nothing redone
        main(conf(), items, out)
        assert calls[3:] == ["im3"]
        with h5py.File(out, "r") as f:
            assert sorted(f.keys()) == ["im0", "im1", "im2", "im3"]
        assert (tmp_path / "f.config.yaml").exists()

        # an interrupted run leaves a .partial file; the rerun finishes it
        partial = tmp_path / "g.h5.partial"
        with h5py.File(partial, "w") as f:
            g = f.create_group("im0")
            for k, v in read_features(out, "im0").__dict__.items():
                g.create_dataset(k, data=v)
            g.attrs["done"] = True
        calls.clear()
        main(conf(), items, tmp_path / "g.h5")
        assert calls == ["im1", "im2", "im3"] and not partial.exists()

    def test_exception(self, tmp_path: Path) -> None:
        p = save(tmp_path / "a.png", texture(50, 50))
        with pytest.raises(ValueError, match="duplicate image ids"):
            main(conf(), [ImageItem("a", p), ImageItem("a", p)], tmp_path / "f.h5")
        c = copy.deepcopy(confs["delf"])
        with pytest.raises(ValueError, match=r"model\.path"):
            F.make_extractor(c)


# ---------------------------------------------------------------------------- kill safety
def _contents(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(file attributes, {id: (datasets, attributes)}) of every finished image of a file."""
    images: dict[str, Any] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and "done" in obj.attrs:
            data = {k: v[()] for k, v in obj.items() if isinstance(v, h5py.Dataset)}
            images[name] = (data, dict(obj.attrs))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
        return dict(f.attrs), images


def assert_same_features(a: Path, b: Path) -> None:
    """Two features files hold the same images, arrays (values and dtypes) and attributes."""
    root_a, ia = _contents(a)
    root_b, ib = _contents(b)
    np.testing.assert_equal(root_a, root_b)
    assert sorted(ia) == sorted(ib)
    for name, (data, attrs) in ia.items():
        data_b, attrs_b = ib[name]
        assert sorted(data) == sorted(data_b) == ["descriptors", "keypoints", "scales", "scores"]
        for k, v in data.items():
            assert v.dtype == data_b[k].dtype, (name, k)
            np.testing.assert_array_equal(v, data_b[k], err_msg=f"{name}/{k}")
        np.testing.assert_equal(attrs, attrs_b)


def _items(tmp_path: Path, n: int, h: int = 90, w: int = 120) -> list[ImageItem]:
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    return [ImageItem(f"im{i}", save(folder / f"{i}.png", texture(h, w, seed=i))) for i in range(n)]


class _Crash(RuntimeError):
    pass


def _counting(monkeypatch: pytest.MonkeyPatch, crash_at: int | None = None) -> list[str]:
    """Record the images ``main`` extracts; raise _Crash once, on call ``crash_at`` (1-based)."""
    calls: list[str] = []
    seen = [0]
    real = F.extract_image

    def counting(ex: Any, item: ImageItem, c: Any) -> Any:
        seen[0] += 1
        if seen[0] == crash_at:
            raise _Crash("simulated crash")
        calls.append(item.name)
        return real(ex, item, c)

    monkeypatch.setattr(F, "extract_image", counting)
    return calls


class TestKillSafety:
    @pytest.mark.slow
    def test_kill9_resumes_and_equals_clean_run(self, tmp_path: Path) -> None:
        """A real ``kill -9`` of ``gldboxes retrieval extract`` once chunks are committed: the
        rerun extracts only the images of no committed chunk, and the final file equals a clean
        run's, image by image."""
        from retrieval.runner.conf import resolve_conf
        from retrieval.runner.driver import extract_folder

        n = 40
        imgs = tmp_path / "imgs"
        imgs.mkdir()
        for i in range(n):
            save(imgs / f"im{i:02d}.png", texture(420, 560, seed=i))
        env = {**os.environ, "TQDM_DISABLE": "1"}
        cmd = [sys.executable, "-m", "gldboxes", "retrieval", "extract"]
        cmd += ["--images", str(imgs), "--out", str(tmp_path / "run")]
        feats_dir = tmp_path / "run" / "features" / "rootsift-n1000"
        with open(tmp_path / "killed.log", "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + 120
            try:
                while not list(feats_dir.glob("*.h5.partial.d/chunk-*.h5")):
                    assert proc.poll() is None, "extraction ended before any chunk was committed"
                    assert time.monotonic() < deadline, "no chunk committed within 120 s"
                    time.sleep(0.005)
            finally:
                proc.send_signal(signal.SIGKILL)  # kill -9 (nothing if it has ended)
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not list(feats_dir.glob("*.h5")), "killed too late: the run had finished"
        (partial,) = feats_dir.glob("*.h5.partial.d")
        committed = set()
        for chunk in partial.glob("chunk-*.h5"):
            committed |= set(_contents(chunk)[1])
        assert 0 < len(committed) < n

        rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        left = n - len(committed)
        assert f"resuming, {left} of {n} images left" in rerun.stderr
        assert f"{left} images extracted, {len(committed)} kept" in rerun.stderr
        out = Path(rerun.stdout.split(": ", 1)[1].strip())
        assert out.parent == feats_dir and out.exists() and not partial.exists()

        clean, _ = extract_folder(resolve_conf(), imgs, tmp_path / "clean")
        assert clean.name == out.name
        assert_same_features(out, clean)
        assert len(_contents(out)[1]) == n

    def test_interrupted_run_keeps_committed_chunks(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        items = _items(tmp_path, 7)
        ref = main(conf(), items, tmp_path / "ref.h5")
        monkeypatch.setattr(F, "_COMMIT_IMAGES", 2, raising=False)
        monkeypatch.setattr(F, "_COMMIT_SECONDS", 1e9, raising=False)
        calls = _counting(monkeypatch, crash_at=6)
        out = tmp_path / "f.h5"
        with pytest.raises(_Crash):
            main(conf(), items, out)
        partial = tmp_path / "f.h5.partial.d"
        # im0..im3 in two full chunks, im4 committed on the way out; nothing else left
        assert sorted(p.name for p in partial.iterdir()) == [
            "chunk-000000.h5",
            "chunk-000001.h5",
            "chunk-000002.h5",
        ]
        assert not out.exists()
        shutil.copytree(partial, tmp_path / "saved")
        calls.clear()
        main(conf(), items, out)
        assert calls == ["im5", "im6"]
        assert not partial.exists()
        assert_same_features(out, ref)
        # killed after the merge, before the folder was removed: nothing is redone or re-merged
        shutil.copytree(tmp_path / "saved", partial)
        mtime = out.stat().st_mtime_ns
        calls.clear()
        main(conf(), items, out)
        assert calls == [] and not partial.exists() and out.stat().st_mtime_ns == mtime

    def test_torn_chunks_discarded(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        items = _items(tmp_path, 6)
        ref = main(conf(), items, tmp_path / "ref.h5")
        monkeypatch.setattr(F, "_COMMIT_IMAGES", 2, raising=False)
        monkeypatch.setattr(F, "_COMMIT_SECONDS", 1e9, raising=False)
        calls = _counting(monkeypatch, crash_at=5)
        out = tmp_path / "f.h5"
        with pytest.raises(_Crash):
            main(conf(), items, out)
        partial = tmp_path / "f.h5.partial.d"
        # a committed chunk damaged on disk, and a chunk a kill tore while it was written
        torn = partial / "chunk-000001.h5"
        torn.write_bytes(torn.read_bytes()[:1000])
        (partial / ".chunk-000002.h5.tmp").write_bytes(os.urandom(3000))
        calls.clear()
        with caplog.at_level(logging.INFO, logger="retrieval.features"):
            main(conf(), items, out)
        assert calls == ["im2", "im3", "im4", "im5"]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and str(torn) in warnings[0] and "damaged" in warnings[0]
        assert not partial.exists()
        assert_same_features(out, ref)

    def test_truncated_output_named_and_redone(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        items = _items(tmp_path, 6)
        ref = main(conf(), items, tmp_path / "ref.h5")
        out = main(conf(), items[:3], tmp_path / "f.h5")
        # an interrupted later run committed im3 before the output got damaged on disk
        monkeypatch.setattr(F, "_COMMIT_IMAGES", 1, raising=False)
        calls = _counting(monkeypatch, crash_at=2)
        with pytest.raises(_Crash):
            main(conf(), items, out)
        assert calls == ["im3"]
        out.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
        with pytest.raises(ValueError, match=re.escape(f"{out}: damaged features file")):
            read_features(out, "im0")
        calls.clear()
        with caplog.at_level(logging.WARNING, logger="retrieval.features"):
            main(conf(), items, out)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and warnings[0].startswith(f"{out}: damaged features file")
        assert calls == ["im0", "im1", "im2", "im4", "im5"]  # im3 kept from its chunk
        assert_same_features(out, ref)
        # a complete file whose image lost a dataset: that image is redone
        with h5py.File(out, "a") as f:
            del f["im1"]["scores"]
        calls.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="retrieval.features"):
            main(conf(), items, out)
        assert calls == ["im1"]
        assert "'im1'" in caplog.records[0].getMessage() and str(out) in caplog.text
        assert_same_features(out, ref)


# ---------------------------------------------------------------------------- validation
def _feature_file(path: Path, name: str, kp: Any, desc: Any) -> Path:
    n = len(kp)
    with h5py.File(path, "w") as f:
        g = f.create_group(name)
        g.create_dataset("keypoints", data=kp)
        g.create_dataset("descriptors", data=desc)
        g.create_dataset("scales", data=np.ones(n, np.float32))
        g.create_dataset("scores", data=np.ones(n, np.float32))
        g.attrs["done"] = True
    return path


_RNG = np.random.default_rng(0)
_KP = _RNG.uniform(0, 50, (5, 2)).astype(np.float32)
_DESC = _RNG.random((5, 8)).astype(np.float32)
_NAN = _DESC.copy()
_NAN[2, 3] = np.nan
_INF_KP = _KP.copy()
_INF_KP[1, 0] = np.inf
# (keypoints, descriptors, message, read_descriptors detects it: keypoint values are not read)
BAD_FEATURES = {
    "keypoints_3_columns": (np.zeros((5, 3), np.float32), _DESC, r"keypoints must be \(N, 2\)", 1),
    "keypoints_flat": (np.zeros(10, np.float32), _DESC, r"keypoints must be \(N, 2\)", 1),
    "keypoints_int": (_KP.astype(np.int32), _DESC, "keypoints must be a float", 1),
    "descriptors_bytes": (_KP, np.full((5, 8), b"0.5"), "descriptors must be a float", 1),
    "descriptors_int_strings": (
        _KP,
        np.array([str(i) for i in range(5)], dtype=h5py.string_dtype()),
        "descriptors must be a float",
        1,
    ),
    "descriptors_int": (_KP, (_DESC * 100).astype(np.int64), "descriptors must be a float", 1),
    "descriptors_flat": (_KP, _DESC.ravel(), r"descriptors must be \(N, D\)", 1),
    "count_mismatch": (_KP, _DESC[:4], "5 keypoints but 4 descriptors", 1),
    "descriptors_nan": (_KP, _NAN, "descriptors hold NaN or inf", 1),
    "keypoints_inf": (_INF_KP, _DESC, "keypoints hold NaN or inf", 0),
}


class TestReadValidation:
    def test_smoke(self, tmp_path: Path) -> None:
        p = _feature_file(tmp_path / "ok.h5", "a/region_1", _KP, _DESC.astype(np.float64))
        feats = read_features(p, "a/region_1")
        np.testing.assert_array_equal(feats.keypoints, _KP)
        (d,) = read_descriptors(p, ["a/region_1"])
        assert d.dtype == np.float32 and d.shape == (5, 8)
        check_features(p, "x", np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))
        # descriptors-only files (codebook training sets) read without keypoints
        with h5py.File(tmp_path / "d.h5", "w") as f:
            f.create_dataset("b/descriptors", data=_DESC)
        assert read_descriptors(tmp_path / "d.h5", ["b"])[0].shape == (5, 8)

    @pytest.mark.parametrize("case", list(BAD_FEATURES))
    def test_exception(self, tmp_path: Path, case: str) -> None:
        kp, desc, msg, in_descriptors = BAD_FEATURES[case]
        p = _feature_file(tmp_path / f"{case}.h5", "img/7", kp, desc)
        with pytest.raises(ValueError, match=re.escape(f"{p}: image 'img/7': ") + msg):
            read_features(p, "img/7")
        if in_descriptors:
            with pytest.raises(ValueError, match=re.escape(f"{p}: image 'img/7': ") + msg):
                read_descriptors(p, ["img/7"])
        with pytest.raises(ValueError, match=re.escape(f"{p}: image 'img/7': ") + msg):
            check_features(p, "img/7", np.asarray(kp), np.asarray(desc))

    def test_missing_and_damaged_files(self, tmp_path: Path) -> None:
        p = _feature_file(tmp_path / "f.h5", "a", _KP, _DESC)
        with h5py.File(p, "a") as f:
            f.create_dataset("b/keypoints", data=_KP)  # no descriptors
        no_desc = re.escape(f"{p}: image 'b' has no 'descriptors' dataset")
        with pytest.raises(ValueError, match=no_desc):
            read_features(p, "b")
        with pytest.raises(ValueError, match=no_desc):
            read_descriptors(p, ["a", "b"])
        with pytest.raises(ValueError, match=re.escape(f"{p}: no features for image 'zz'")):
            read_features(p, "zz")
        with pytest.raises(FileNotFoundError, match=r"nope\.h5"):
            read_features(tmp_path / "nope.h5", "a")
        with pytest.raises(FileNotFoundError, match=r"nope\.h5"):
            read_descriptors(tmp_path / "nope.h5", ["a"])
        p.write_bytes(p.read_bytes()[:3000])  # truncated
        for read in (
            lambda: read_features(p, "a"),
            lambda: read_descriptors(p, ["a"]),
            lambda: failures(p),
        ):
            with pytest.raises(ValueError, match=re.escape(f"{p}: damaged features file")) as err:
                read()
            assert "\n" not in str(err.value)
        (tmp_path / "text.h5").write_text("not HDF5\n")
        with pytest.raises(ValueError, match=r"text\.h5: damaged features file"):
            read_descriptors(tmp_path / "text.h5", ["a"])


# ---------------------------------------------------------------------------- DELF


def _datum_bytes(arr: np.ndarray) -> bytes:
    """Encode a DatumProto by hand: shape {dim (packed int64)}, float_list {value (packed)}."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    dims = b"".join(varint(d) for d in arr.shape)
    shape = b"\x0a" + varint(len(dims)) + dims
    vals = arr.astype("<f4").tobytes()
    flist = b"\x0a" + varint(len(vals)) + vals
    return b"\x0a" + varint(len(shape)) + shape + b"\x12" + varint(len(flist)) + flist


def test_read_datum_roundtrip(tmp_path: Path) -> None:
    a = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    (tmp_path / "m.datum").write_bytes(_datum_bytes(a))
    np.testing.assert_array_equal(read_datum(tmp_path / "m.datum"), a)
    (tmp_path / "bad.datum").write_bytes(_datum_bytes(a)[:-7] + b"\x0a\xff")
    with pytest.raises(ValueError):
        read_datum(tmp_path / "bad.datum")
    assert struct.calcsize("<f") == 4


def _tf2_delf(path: Path, dim: int) -> None:
    import tensorflow as tf

    rng = np.random.default_rng(0)

    class TinyDelf(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(0.2 * rng.standard_normal((4, 4, 3, dim)).astype(np.float32))
            self.a = tf.Variable(rng.standard_normal((dim, 1)).astype(np.float32))

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, None, 3], tf.uint8, name="input_image"),
                tf.TensorSpec([None], tf.float32, name="input_scales"),
                tf.TensorSpec([], tf.int32, name="input_max_feature_num"),
                tf.TensorSpec([], tf.float32, name="input_abs_thres"),
            ]
        )
        def serve(
            self,
            input_image: Any,
            input_scales: Any,
            input_max_feature_num: Any,
            input_abs_thres: Any,
        ) -> dict[str, Any]:
            img = tf.cast(input_image, tf.float32)[None] / 255.0
            hw = tf.cast(tf.shape(img)[1:3], tf.float32)
            bx = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
            ft = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
            sc = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
            at = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
            for i in tf.range(tf.shape(input_scales)[0]):
                s = input_scales[i]
                im = tf.image.resize(img, tf.cast(tf.round(hw * s), tf.int32))
                f = tf.nn.conv2d(im, self.w, strides=4, padding="VALID")[0]
                g = tf.shape(f)
                f = tf.reshape(f, [-1, dim])
                att = 150.0 * tf.nn.sigmoid(tf.matmul(f, self.a))[:, 0]
                yy, xx = tf.meshgrid(tf.range(g[0]), tf.range(g[1]), indexing="ij")
                y0 = tf.cast(tf.reshape(yy, [-1]) * 4, tf.float32)
                x0 = tf.cast(tf.reshape(xx, [-1]) * 4, tf.float32)
                bx = bx.write(i, tf.stack([y0, x0, y0 + 3.0, x0 + 3.0], axis=1))
                ft = ft.write(i, f)
                sc = sc.write(i, tf.fill(tf.shape(att), s))
                at = at.write(i, att)
            boxes = tf.reshape(bx.concat(), [-1, 4])
            feats = tf.reshape(ft.concat(), [-1, dim])
            scales, scores = tf.reshape(sc.concat(), [-1]), tf.reshape(at.concat(), [-1])
            keep = scores > input_abs_thres
            boxes, feats = tf.boolean_mask(boxes, keep), tf.boolean_mask(feats, keep)
            scales, scores = tf.boolean_mask(scales, keep), tf.boolean_mask(scores, keep)
            k = tf.minimum(input_max_feature_num, tf.shape(scores)[0])
            top = tf.math.top_k(scores, k).indices
            return {
                "boxes": tf.gather(boxes, top),
                "features": tf.gather(feats, top),
                "scales": tf.gather(scales, top),
                "scores": tf.gather(scores, top),
            }

    m = TinyDelf()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.serve})


def _tf1_delf(path: Path) -> None:
    import tensorflow as tf

    v1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        img = v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
        scales = v1.placeholder(tf.float32, [None], name="input_scales")
        thr = v1.placeholder(tf.float32, [], name="input_abs_thres")
        v1.placeholder(tf.int32, [], name="input_max_feature_num")
        mean = tf.reduce_mean(tf.cast(img, tf.float32))
        att = 200.0 * scales
        keep = att > thr
        n = tf.shape(scales)[0]
        z = tf.zeros([n])
        boxes = tf.stack([z, z, 10.0 * scales, 20.0 * scales], axis=1)
        feats = tf.stack([scales, tf.fill([n], mean), tf.ones([n])], axis=1)
        tf.identity(tf.boolean_mask(boxes, keep), name="boxes")
        tf.identity(tf.boolean_mask(feats, keep), name="features")
        tf.identity(tf.boolean_mask(scales, keep), name="scales")
        tf.identity(tf.boolean_mask(att, keep), name="scores")
        with v1.Session(graph=g) as sess:
            b = v1.saved_model.Builder(str(path))
            b.add_meta_graph_and_variables(sess, [v1.saved_model.tag_constants.SERVING])
            b.save()


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.slow
class TestDelf:
    def test_tf2_signature_with_pca(self, tmp_path: Path) -> None:
        import tensorflow as tf

        dim = 16
        _tf2_delf(tmp_path / "model", dim)
        rng = np.random.default_rng(1)
        mean = rng.standard_normal(dim).astype(np.float32) * 0.1
        proj = rng.standard_normal((dim, dim)).astype(np.float32)
        pca_dir = tmp_path / "pca"
        pca_dir.mkdir()
        (pca_dir / "mean.datum").write_bytes(_datum_bytes(mean))
        (pca_dir / "pca_proj_mat.datum").write_bytes(_datum_bytes(proj))
        rgb = np.stack([texture(64, 96, s) for s in (1, 2, 3)], axis=2)
        p = save(tmp_path / "im.png", rgb)
        c = copy.deepcopy(confs["delf"])
        c["model"].update(
            path=str(tmp_path / "model"), pca_path=str(pca_dir), pca_dim=8, max_features=50
        )
        ex = F.make_extractor(c)
        feats, size = extract_image(ex, ImageItem("im", p), c)
        assert size == (96, 64) and feats.descriptors.shape[1] == 8
        n = feats.descriptors.shape[0]
        assert 0 < n <= 50 and np.all(feats.scores > 100.0)
        # the same computation by hand from the raw signature outputs
        fn = tf.saved_model.load(str(tmp_path / "model")).signatures["serving_default"]
        out = fn(
            input_image=tf.constant(rgb),
            input_scales=tf.constant(DELF_SCALES),
            input_abs_thres=tf.constant(100.0),
            input_max_feature_num=tf.constant(50),
        )
        boxes, sc = out["boxes"].numpy(), out["scales"].numpy()
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2 / sc[:, None]
        np.testing.assert_allclose(feats.keypoints, centre[:, ::-1], rtol=1e-5)
        ref = _l2n((_l2n(out["features"].numpy()) - mean) @ proj[:8].T)
        np.testing.assert_allclose(feats.descriptors, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(feats.scales, sc)
        # a features file through main()
        h5 = main(c, [ImageItem("im", p)], tmp_path / "d.h5")
        assert read_features(h5, "im").descriptors.shape == (n, 8)

    def test_tf1_named_tensors(self, tmp_path: Path) -> None:
        _tf1_delf(tmp_path / "model")
        rgb = np.full((40, 60, 3), 90, np.uint8)
        p = save(tmp_path / "im.png", rgb)
        c = copy.deepcopy(confs["delf"])
        c["model"].update(path=str(tmp_path / "model"))
        ex = F.make_extractor(c)
        feats, _ = extract_image(ex, ImageItem("im", p), c)
        # scores 200*s > 100 keeps the scales above 0.5: 0.7071, 1, 1.4142, 2
        np.testing.assert_allclose(feats.scales, [0.7071, 1.0, 1.4142, 2.0], rtol=1e-6)
        np.testing.assert_allclose(feats.keypoints, np.tile([10.0, 5.0], (4, 1)), rtol=1e-5)
        raw = np.stack([feats.scales, np.full(4, 90.0), np.ones(4)], axis=1)
        np.testing.assert_allclose(feats.descriptors, _l2n(raw), rtol=1e-5)

    def test_missing_model(self, tmp_path: Path) -> None:
        c = copy.deepcopy(confs["delf"])
        c["model"]["path"] = str(tmp_path)
        with pytest.raises(FileNotFoundError, match=r"saved_model\.pb"):
            F.make_extractor(c)


class TestBudgetAndUpright:
    def test_upright_one_descriptor_per_keypoint_at_angle_zero(self, tmp_path: Path) -> None:
        img = texture(300, 400, seed=3)
        p = save(tmp_path / "u.png", img)
        c = conf()
        c["model"].update(max_features=400, upright=True)
        feats, _ = extract_image(F.make_extractor(c), ImageItem("u", p), c)
        kp = feats.keypoints
        n = kp.shape[0]
        assert n > 50
        # SIFT repeats a keypoint per dominant orientation; upright keeps one per location/size
        rows = np.round(np.c_[kp, feats.scales], 2)
        assert np.unique(rows, axis=0).shape[0] == n
        # the helper: one keypoint per (location, size, octave), the strongest, at angle 0
        sift = cv2.SIFT_create(nfeatures=400)  # type: ignore[attr-defined]
        raw = sift.detect(img, None)
        up = F.RootSift._upright(raw)
        assert all(k.angle == 0.0 for k in up)
        assert len(raw) > len(up) == len({(k.pt, k.size, k.octave) for k in raw})
        # ... which differ from the oriented ones (rotation invariance is switched off)
        c2 = conf()
        c2["model"]["max_features"] = 400
        oriented, _ = extract_image(F.make_extractor(c2), ImageItem("u", p), c2)
        assert not np.allclose(
            oriented.descriptors[:n], feats.descriptors[: oriented.descriptors.shape[0]]
        )

    def test_budget_and_names(self) -> None:
        from retrieval.runner.conf import feature_conf, resolve_conf

        assert feature_conf(resolve_conf())["output"] == "rootsift-n1000"
        fc = feature_conf(resolve_conf(feature_model={"max_features": 4000, "upright": True}))
        assert fc["output"] == "rootsift-n4000-up" and fc["model"]["max_features"] == 4000
        assert feature_conf(resolve_conf(features="rootsift-n4000"))["output"] == "rootsift-n4000"
        small = feature_conf(resolve_conf(feature_preprocessing={"max_side": 800}))
        assert small["output"] == "rootsift-n1000-r800"
        # a setting the name does not spell out still gets its own folder
        other = feature_conf(resolve_conf(feature_model={"contrast_threshold": 0.02}))
        assert other["output"].startswith("rootsift-n1000-") and other["output"] != "rootsift-n1000"
        with pytest.raises(ValueError, match="preprocessing"):
            feature_conf(resolve_conf(feature_preprocessing={"max_size": 3}))
        with pytest.raises(ValueError, match="max_features"):
            F.make_extractor({**conf(), "model": {**conf()["model"], "max_features": 0}})
