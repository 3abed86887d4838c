"""The distill stage as one function: dataset + config (+ teacher checkpoint) -> student checkpoint.

Both ``bckd distill`` and ``bckd run`` call :func:`distill_stage`; neither adds logic of its own.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from distill.checkpoint import load_student
from distill.losses import method_names
from distill.trainer import TrainResult, tensorboard_dir, train
from runtime.config import DataConfig, KDConfig, ModelConfig, TrainConfig
from runtime.data import open_dataset
from runtime.data.preprocess import Preprocess
from runtime.errors import BckdError
from runtime.tasks import get_task, task_name
from runtime.files import atomic_write_json, refuse_existing, sha256_file, sha256_json


def distill_stage(*, data: DataConfig, data_root: str | os.PathLike, model: ModelConfig,
                  train_cfg: TrainConfig, out: str | os.PathLike, method: str = "none",
                  kd: KDConfig | None = None, teacher: str | os.PathLike | None = None,
                  resume: bool = False, force: bool = False, root_label: str | None = None,
                  log: Callable[[str], None] = print) -> TrainResult:
    """Train ``model`` on ``data_root`` (distilled from ``teacher`` unless method is 'none').

    ``root_label`` is what the card records as the data root (default: the resolved path); the
    end-to-end run passes a path relative to its output folder.
    """
    kd = kd or KDConfig()
    task = get_task(data.task).name
    losses = method_names(method, kd.options, task)
    if losses and not teacher:
        raise BckdError(f"method '{method}' distils from a teacher; pass --teacher CHECKPOINT "
                        "(or use --method none)")
    train_src = open_dataset(data_root, data.train_split, format=data.format)
    val_src = open_dataset(data_root, data.val_split, format=data.format)
    get_task(task).check_dataset(train_src, None, data_root)
    preprocess = Preprocess(size=tuple(data.input_size), ignore_index=train_src.ignore_index)
    teacher_model, teacher_card = (load_student(teacher) if losses else (None, None))
    if teacher_card is not None and task_name(teacher_card) != task:
        raise BckdError(f"teacher {teacher} is a '{task_name(teacher_card)}' model but this run "
                        f"trains a '{task}' one; use a teacher of the same task")
    if teacher_card is not None:
        _check_teacher(teacher_card, train_src.classes, teacher)
    meta_file = Path(data_root) / "dataset.json"
    data_info = {"root": root_label or str(Path(data_root).resolve()), "name": train_src.meta.get("name"),
                 "format": data.format, "train_split": data.train_split,
                 "val_split": data.val_split, "images": {"train": len(train_src), "val": len(val_src)},
                 # standard datasets have no dataset.json: their loader's metadata describes them
                 "meta_sha256": (sha256_file(meta_file) if meta_file.is_file()
                                 else sha256_json(train_src.meta))}
    return train(model_cfg=model, train_cfg=train_cfg, train_source=train_src,
                 val_source=val_src, preprocess=preprocess, classes=train_src.classes, out=out,
                 teacher=teacher_model, teacher_card=teacher_card, method=method, kd_options=kd.options,
                 tensorboard=tensorboard_dir(out) if train_cfg.tensorboard else None,
                 log_every=train_cfg.log_every, task=task,
                 postprocess=None if task == "semantic" else default_postprocess(),
                 data_info=data_info, resume=resume, force=force, log=log)


def default_postprocess() -> dict:
    """The NMS settings a detector's card records for evaluation (host NMS by default)."""
    from runtime.tasks.nms import NMSSettings

    return {"nms": "host", **NMSSettings().to_dict()}


def _check_teacher(card: dict, classes: list[str], path) -> None:
    if list(card.get("classes", [])) != list(classes):
        raise BckdError(f"teacher {path} was trained on classes {card.get('classes')} but the "
                        f"dataset has {classes}; use a teacher trained on this dataset")


def mfs_stage(*, student: str | os.PathLike, teacher: str | os.PathLike,
              data_root: str | os.PathLike, split: str = "val", format: str = "folder",
              images: int = 32, out: str | os.PathLike | None = None, force: bool = False,
              **settings) -> dict:
    """MFS (method.md §5.1) of a student checkpoint against its teacher on ``images`` images.

    ``settings`` go to :func:`distill.analysis.manifold_stability` (epsilon, eta, directions,
    ascent_steps). The images are the first ``images`` of ``split``, preprocessed by the
    student's card. With ``out`` the result is also written as JSON (never over a file unless
    ``force``).
    """
    import torch

    from distill.analysis import manifold_stability

    if out is not None:
        refuse_existing(out, "MFS result", force)
    s_model, s_card = load_student(student)
    t_model, _ = load_student(teacher)
    source = open_dataset(data_root, split, format=format)
    pre = Preprocess.from_dict(s_card["preprocess"])
    count = min(images, len(source))
    if count < 1:
        raise BckdError(f"split '{split}' of {data_root} has no images to analyse")
    batches = (torch.from_numpy(pre.batch([source.load(i)[0] for i in range(j, min(j + 8, count))]))
               for j in range(0, count, 8))
    try:
        result = manifold_stability(s_model, t_model, batches, **settings)
    except ValueError as exc:
        raise BckdError(f"MFS: {exc}") from exc
    result["student"], result["teacher"] = str(student), str(teacher)
    if out is not None:
        atomic_write_json(out, result)
    return result
