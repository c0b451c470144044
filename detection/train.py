"""Train a landmark detector preset with Model Garden's Orbit loop: checkpoints, resume, logs.

A run folder ``RUNS/<conf["output"]>/`` holds::

    detector.yaml          our preset (resolved), seed, records folder, library versions
    params.yaml            the full Model Garden ExperimentConfig (re-loadable with --config_file)
    ckpt-N.*, checkpoint   TF checkpoints every ``checkpoint_interval`` steps (resume points)
    train/                 TensorBoard summaries (losses, learning rate)
    validation/            TensorBoard summaries of the evaluations during training:
                           ``eval/AP50`` (AP@0.5, the paper's metric), ``eval/AP``,
                           ``eval/validation_loss``, one point per evaluated step
    eval/<split>-step<N>.json   metrics of each evaluation (as ``gldboxes detect eval``)
    eval_history.json, .csv     every evaluation during training and the best one
    best/ckpt-N.*          copy of the checkpoint with the highest AP@0.5 so far
    train.json             steps done, wall time, steps/s, last losses (written when finished)

Running ``main`` again resumes from the newest checkpoint; it is skipped when ``train.json``
says the requested number of steps is done.

With ``eval_every=N`` (Model Garden's ``train_and_eval`` mode, driven here) training stops every
N steps and at the last step, saves a checkpoint, and the model in memory is evaluated on the
validation split with the COCO evaluator of :func:`detection.evaluate.evaluate_trainer` (the
code behind ``gldboxes detect eval``; no checkpoint reload, no second model).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from detection.configs import build_experiment, versions
from detection.init import initializer, resolve_init_source
from detection.records import RecordsInfo, load_records_info
from detection.tfcompat import import_tf
from gldboxes.io import atomic_dir, atomic_write, read_json, write_config, write_json

__all__ = [
    "EVAL_HISTORY",
    "load_eval_history",
    "load_run_conf",
    "main",
    "seed_everything",
    "strategy_for_devices",
]

logger = logging.getLogger("detection.train")

EVAL_HISTORY = "eval_history.json"  # in the run folder; a CSV twin beside it
_HISTORY_COLUMNS = ("step", "ap50", "ap", "validation_loss", "seconds", "checkpoint")


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
    eval_every: int | None = None,
    eval_records: str | os.PathLike[str] | None = None,
    eval_split: str = "val",
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
        eval_every: evaluate AP@0.5 every this many steps and at the last step (see the
            module docstring); ``None``: the preset's ``eval_every``; 0: no evaluation.
        eval_records: records folder holding ``eval_split`` (default ``records_dir``).
        eval_split: the records split evaluated during training.
        overwrite: delete the run folder and start from scratch.

    Returns:
        The run folder.
    """
    run_dir = Path(runs_dir) / str(conf["output"])
    target = int(steps if steps is not None else conf["train_steps"])
    if target < 1:
        raise ValueError(f"steps must be >= 1, got {target}")
    if eval_every is None:
        eval_every = conf.get("eval_every") or None
    elif eval_every < 0:
        raise ValueError(f"eval_every must be >= 0 (0: no evaluation), got {eval_every}")
    else:
        eval_every = eval_every or None  # 0: off, even when the preset evaluates
    fresh = overwrite or not any(run_dir.glob("ckpt-*.index"))  # a resumed run needs no init
    if (
        fresh
        and conf.get("requires_init_checkpoint")
        and not (init_checkpoint or conf.get("init_checkpoint"))
    ):
        raise ValueError(
            f"{conf['output']} fine-tunes a pretrained detector: pass --init-checkpoint FILE "
            "(ImageNet .h5 or Model Garden checkpoint, see README 'Detectors') or 'none'"
        )
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    done = run_dir / "train.json"
    if done.is_file() and int(read_json(done).get("steps", -1)) >= target:
        logger.info("%s already trained for %d steps", run_dir, target)
        return run_dir
    records = load_records_info(records_dir)
    if not records.splits.get("train"):
        raise ValueError(f"{records_dir}: the train split is empty")
    eval_info: RecordsInfo | None = None
    if eval_every is not None:
        eval_dir = records_dir if eval_records is None else eval_records
        eval_info = load_records_info(eval_dir)
        if not eval_info.splits.get(eval_split):
            raise ValueError(
                f"{eval_dir}: split {eval_split!r} to evaluate during training is empty or absent"
            )

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
    if eval_info is not None:
        params.task.validation_data.input_path = eval_info.pattern(eval_split)
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
    if eval_info is not None:
        from detection.evaluate import squeeze_groundtruth_counts

        squeeze_groundtruth_counts(task, tf)
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
        mode="train" if eval_every is None else "train_and_eval",  # the latter builds eval data
        params=params,
        model_dir=str(run_dir),
    )
    step0 = int(runner.trainer.global_step.numpy())
    if step0:
        logger.info("resuming %s from step %d", run_dir, step0)
    # Stops: every eval_every steps and the last step (one stop when not evaluating).
    stops = [target]
    if eval_every is not None:
        stops = [s for s in range(eval_every, target, eval_every) if s > step0] + [target]
    evals: _EvalLog | None = None
    if eval_info is not None:
        evals = _EvalLog(run_dir, eval_info, eval_split, int(eval_every or 0), tf)
    try:
        for stop in stops:
            with strategy.scope():
                runner.controller.train(steps=stop)  # saves a checkpoint at ``stop``
            if evals is not None:
                evals.evaluate(runner.trainer, strategy, conf)
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
            "best": None if evals is None else evals.best,
        },
    )
    logger.info("trained %s to step %d in %.1f s", run_dir, step, seconds)
    return run_dir


def load_eval_history(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The evaluations during training of a run (its ``eval_history.json``).

    Returns:
        ``{"format_version": 1, "records", "split", "every", "evals": [{"step", "ap50", "ap",
        "validation_loss", "seconds", "checkpoint"}, ...] (by step), "best": {"step", "ap50",
        "checkpoint"} | None}``.

    Raises:
        FileNotFoundError: the run has no evaluation history.
        ValueError: the file is not an evaluation history.
    """
    path = Path(run_dir) / EVAL_HISTORY
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evaluation history (train with eval_every)")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format_version") != 1 or "evals" not in data:
        raise ValueError(f"{path}: not an evaluation history (format_version 1 with evals)")
    return data


class _EvalLog:
    """Evaluations during training: metrics JSON, TensorBoard scalars, history, best copy."""

    def __init__(self, run_dir: Path, records: RecordsInfo, split: str, every: int, tf: Any):
        self._run_dir = run_dir
        self._records = records
        self._split = split
        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(run_dir / "validation"))
        try:
            old = load_eval_history(run_dir)
        except FileNotFoundError:
            old = {"evals": [], "best": None}
        self._history: dict[str, Any] = {
            "format_version": 1,
            "records": str(Path(records.root).resolve()),
            "split": split,
            "every": every,
            "evals": list(old["evals"]),
            "best": old["best"],
        }

    @property
    def best(self) -> dict[str, Any] | None:
        """``{"step", "ap50", "checkpoint"}`` of the best evaluation so far, or ``None``."""
        best: dict[str, Any] | None = self._history["best"]
        return best

    def evaluate(self, trainer: Any, strategy: Any, conf: Mapping[str, Any]) -> dict[str, Any]:
        """Evaluate the model in memory at its current step; record and return the metrics."""
        from detection.evaluate import evaluate_trainer, metrics_record

        tf = self._tf
        step = int(trainer.global_step.numpy())
        ckpt = tf.train.latest_checkpoint(str(self._run_dir))
        started = time.perf_counter()
        scores = evaluate_trainer(trainer, strategy, tf, name=str(self._run_dir))
        seconds = time.perf_counter() - started
        record = metrics_record(
            scores,
            run_dir=self._run_dir,
            conf=conf,
            records=self._records,
            split=self._split,
            checkpoint=ckpt,
            seconds=seconds,
        )
        write_json(self._run_dir / "eval" / f"{self._split}-step{step}.json", record)
        ap50 = float(scores["ap50"])
        ap = float(scores["coco"].get("AP", float("nan")))
        loss = scores["validation_loss"]
        with self._writer.as_default():
            tf.summary.scalar("eval/AP50", ap50, step=step)
            tf.summary.scalar("eval/AP", ap, step=step)
            if loss is not None:
                tf.summary.scalar("eval/validation_loss", float(loss), step=step)
        self._writer.flush()
        row = {
            "step": step,
            "ap50": ap50,
            "ap": ap,
            "validation_loss": None if loss is None else float(loss),
            "seconds": round(seconds, 2),
            "checkpoint": ckpt,
        }
        evals = [e for e in self._history["evals"] if int(e["step"]) != step] + [row]
        self._history["evals"] = sorted(evals, key=lambda e: int(e["step"]))
        best = self._history["best"]
        better = best is None or ap50 > float(best["ap50"])
        if ckpt is not None and math.isfinite(ap50) and better:
            self._history["best"] = {
                "step": step,
                "ap50": ap50,
                "checkpoint": self._keep_best(ckpt),
            }
        self._write_history()
        logger.info(
            "step %d: AP@0.5 = %.4f on %d %s images (%.1f s)",
            step,
            ap50,
            self._records.splits[self._split],
            self._split,
            seconds,
        )
        return row

    def _keep_best(self, ckpt: str) -> str:
        """Copy checkpoint ``ckpt`` (prefix) to ``run_dir/best/``; its new prefix."""
        src = Path(ckpt)
        best_dir = self._run_dir / "best"
        with atomic_dir(best_dir) as tmp:
            for f in src.parent.glob(src.name + ".*"):
                shutil.copy2(f, tmp / f.name)
            (tmp / "checkpoint").write_text(
                f'model_checkpoint_path: "{src.name}"\nall_model_checkpoint_paths: "{src.name}"\n',
                encoding="utf-8",
            )
        return str(best_dir / src.name)

    def _write_history(self) -> None:
        import csv

        write_json(self._run_dir / EVAL_HISTORY, self._history)
        csv_path = (self._run_dir / EVAL_HISTORY).with_suffix(".csv")
        with atomic_write(csv_path, newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(_HISTORY_COLUMNS)
            for e in self._history["evals"]:
                w.writerow(["" if e[k] is None else e[k] for k in _HISTORY_COLUMNS])
