"""The lean SavedModel export (default) against Model Garden's full export, the reference: same
signature, same detections from the same checkpoint, far fewer saved functions to restore.
~40 s on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_models import randomise_weights

from detection import configs, export
from detection.inference import load_detector

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _checkpoint(out: Path, conf: dict[str, Any]) -> str:
    """A ``model=`` checkpoint (as training writes) of ``conf`` with randomised weights."""
    import tensorflow as tf
    from official.core import task_factory

    model = task_factory.get_task(configs.build_experiment(conf, None).task).build_model()
    randomise_weights(model.weights, 11)
    for w in model.weights:  # keep batch norm sane so the head scores vary
        if "gamma" in w.name or "moving_variance" in w.name:
            w.assign(np.ones(tuple(w.shape), np.float32))
    return str(tf.train.Checkpoint(model=model).write(str(out / "ckpt-3")))


def _n_functions(saved_model: Path) -> int:
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((saved_model / "saved_model.pb").read_bytes())
    return len(proto.meta_graphs[0].graph_def.library.function)


@pytest.mark.slow
class TestLeanExport:
    def test_real_case(self, tmp_path: Path) -> None:
        conf = configs.get_conf("tiny_cpu")
        ckpt = _checkpoint(tmp_path, conf)
        full = export.main(None, tmp_path / "full", checkpoint=ckpt, conf=conf, lean=False)
        lean = export.main(None, tmp_path / "lean", checkpoint=ckpt, conf=conf)
        rand = export.main(None, tmp_path / "rand", checkpoint="random", conf=conf)
        assert (lean / "detector.json").is_file() and (lean / "params.yaml").is_file()
        # Only the serving function and what it calls: Model Garden's export also saves every
        # Keras layer's traced call functions.
        n_full, n_lean = _n_functions(full), _n_functions(lean)
        assert n_lean * 3 < n_full, (n_lean, n_full)

        d_full, d_lean, d_rand = (load_detector(p) for p in (full, lean, rand))
        assert d_lean.layout == d_full.layout == "model_garden"
        sig_full = d_full._keep.signatures["serving_default"]
        sig_lean = d_lean._keep.signatures["serving_default"]
        assert sig_lean.structured_input_signature == sig_full.structured_input_signature
        assert sorted(sig_lean.structured_outputs) == sorted(sig_full.structured_outputs)

        rng = np.random.default_rng(0)
        for shape in ((240, 320, 3), (300, 200, 3)):  # any size: one traced signature
            rgb = rng.integers(0, 256, shape, dtype=np.uint8)
            a, b, r = d_full(rgb), d_lean(rgb), d_rand(rgb)
            assert len(a.scores) > 0
            np.testing.assert_array_equal(a.classes, b.classes)
            np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-5)
            np.testing.assert_allclose(b.scores, a.scores, atol=1e-6)
            # The checkpoint was restored: the seeded initial weights detect otherwise.
            assert len(r.scores) != len(b.scores) or not np.allclose(r.scores, b.scores)
