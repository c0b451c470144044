"""Train a landmark detector preset with Model Garden's Orbit loop: checkpoints, resume, logs.

A run folder ``RUNS/<conf["output"]>/`` holds::

    detector.yaml          our preset (resolved), seed, records folder, library versions
    params.yaml            the full Model Garden ExperimentConfig (re-loadable with --config_file)
    ckpt-N.*, checkpoint   TF checkpoints every ``checkpoint_interval`` steps (resume points)
    train/                 TensorBoard summaries (losses, learning rate)
    validation/            TensorBoard summaries of ``gldboxes detect eval``
    train.json             steps done, wall time, steps/s, last losses (written when finished)

Running ``main`` again resumes from the newest checkpoint; it is skipped when ``train.json``
says the requested number of steps is done.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detection.configs import build_experiment, versions
from detection.init import initializer, resolve_init_source
from detection.records import load_records_info
from detection.tfcompat import import_tf
from gldboxes.io import read_json, write_config, write_json

__all__ = ["load_run_conf", "main", "seed_everything", "strategy_for_devices"]

logger = logging.getLogger("detection.train")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (weights init, augmentation, shuffling)."""
    import random

    import numpy as np
    import tensorflow as tf

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - TF/Keras initialisers read the legacy global state
    tf.random.set_seed(seed)


def strategy_for_devices() -> Any:
    """``MirroredStrategy`` over all GPUs when there are several, else the default strategy."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def load_run_conf(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The preset a run folder was trained with (its ``detector.yaml``).

    Raises:
        FileNotFoundError: ``run_dir`` is not a run folder.
    """
    import yaml

    path = Path(run_dir) / "detector.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a detector run folder (no detector.yaml)")
    with open(path, encoding="utf-8") as fh:
        conf = yaml.safe_load(fh)
    if not isinstance(conf, dict) or "family" not in conf:
        raise ValueError(f"{path}: not a detector preset (no 'family' key)")
    return conf


class _Progress:
    """An Orbit train action: a tqdm bar over steps with the latest total loss."""

    def __init__(self, global_step: Any, total: int) -> None:
        from gldboxes.progress import tqdm

        self._step = global_step
        start = int(global_step.numpy())
        self._bar = tqdm(total=total, initial=start, desc="train", unit="step")
        self.last: dict[str, float] = {}

    def __call__(self, output: Mapping[str, Any] | None) -> None:
        step = int(self._step.numpy())
        self._bar.update(step - self._bar.n)
        if output:
            self.last = {
                k: float(v)
                for k, v in output.items()
                if getattr(v, "shape", ()) == () or not hasattr(v, "shape")
            }
            if "total_loss" in self.last:
                self._bar.set_postfix(loss=f"{self.last['total_loss']:.3f}", refresh=False)

    def close(self) -> None:
        self._bar.close()


def main(
    conf: Mapping[str, Any],
    records_dir: str | os.PathLike[str],
    runs_dir: str | os.PathLike[str],
    *,
    steps: int | None = None,
    init_checkpoint: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Train ``conf`` on the ``train`` split of ``records_dir``; resume when interrupted.

    Args:
        conf: a preset of ``detection.configs.confs``.
        records_dir: folder written by ``detection.records.main``.
        runs_dir: parent folder; the run goes to ``runs_dir/conf["output"]``.
        steps: total steps to reach (default ``conf["train_steps"]``); raising it and running
            again continues training from the last checkpoint.
        init_checkpoint: checkpoint path/URL overriding ``conf["init_checkpoint"]``; ``"none"``
            trains from scratch.
        overwrite: delete the run folder and start from scratch.

    Returns:
        The run folder.
    """
    run_dir = Path(runs_dir) / str(conf["output"])
    target = int(steps if steps is not None else conf["train_steps"])
    if target < 1:
        raise ValueError(f"steps must be >= 1, got {target}")
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    done = run_dir / "train.json"
    if done.is_file() and int(read_json(done).get("steps", -1)) >= target:
        logger.info("%s already trained for %d steps", run_dir, target)
        return run_dir
    records = load_records_info(records_dir)
    if not records.splits.get("train"):
        raise ValueError(f"{records_dir}: the train split is empty")

    tf = import_tf()
    import official.vision  # noqa: F401 - registers the vision tasks and experiments
    from official.core import task_factory, train_lib, train_utils
    from official.modeling import performance

    run_dir.mkdir(parents=True, exist_ok=True)
    conf = dict(conf)
    conf["train_steps"] = target
    spec = conf.get("init_checkpoint") if init_checkpoint is None else init_checkpoint
    if isinstance(spec, str) and spec.strip().lower() in ("", "none"):
        spec = None  # "none": train from scratch even when the preset names a checkpoint
    conf["init_checkpoint"] = spec
    # A Keras ImageNet .h5 or a TF checkpoint (detection.init); ValueError when unusable.
    ckpt = resolve_init_source(spec, run_dir / "init_cache")
    init_fn = initializer(ckpt, str(conf["init_checkpoint_modules"])) if ckpt else None
    params = build_experiment(conf, records, init_checkpoint=ckpt)
    write_config(
        run_dir,
        {
            **conf,
            "resolved_init_checkpoint": ckpt,
            "records": str(Path(records_dir).resolve()),
            "versions": versions(),
        },
        name="detector.yaml",
    )
    train_utils.serialize_config(params, str(run_dir))
    seed_everything(int(conf["seed"]))
    if params.runtime.mixed_precision_dtype not in (None, "float32"):
        performance.set_mixed_precision_policy(params.runtime.mixed_precision_dtype)

    strategy = strategy_for_devices()
    with strategy.scope():
        task = task_factory.get_task(params.task, logging_dir=str(run_dir))
    if init_fn is not None:
        task.initialize = init_fn  # called by Orbit only when the run has no checkpoint yet
    started = time.perf_counter()
    progress: _Progress | None = None

    class _Runner(train_lib.OrbitExperimentRunner):
        def _build_controller(self, trainer: Any, evaluator: Any, **kw: Any) -> Any:
            nonlocal progress
            progress = _Progress(trainer.global_step, target)
            kw["train_actions"] = [*(kw.get("train_actions") or []), progress]
            return super()._build_controller(trainer, None, **kw)

    runner = _Runner(
        distribution_strategy=strategy,
        task=task,
        mode="train",
        params=params,
        model_dir=str(run_dir),
    )
    step0 = int(runner.trainer.global_step.numpy())
    if step0:
        logger.info("resuming %s from step %d", run_dir, step0)
    try:
        with strategy.scope():
            runner.controller.train(steps=target)
    finally:
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - started
    step = int(runner.trainer.global_step.numpy())
    last = progress.last if progress is not None else {}
    write_json(
        done,
        {
            "format_version": 1,
            "steps": step,
            "resumed_from": step0,
            "seconds": round(seconds, 2),
            "steps_per_second": round((step - step0) / seconds, 4) if seconds > 0 else None,
            "last_losses": last,
            "checkpoint": tf.train.latest_checkpoint(str(run_dir)),
        },
    )
    logger.info("trained %s to step %d in %.1f s", run_dir, step, seconds)
    return run_dir
