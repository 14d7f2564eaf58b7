"""Pretext tasks (corruptions) for energy-based restoration pretraining.

``corrupt(x, task, seed=0, **params) -> (corrupted, weight)`` corrupts normalised images with one
task (``mim``, ``sort``, ``sr``, ``denoise``, ``colorize``, ``mix``); ``prepare_batch(images, tasks,
seed=...)`` goes from a uint8/float pixel batch to (clean, corrupted, weight, task_ids) in one call and
uses the fused CUDA kernel (``csrc/``) for CUDA tensors when it builds.

Every random decision comes from a counter-based Philox4x32-10 stream keyed by (seed, offset,
global sample id), so results are reproducible, independent of how a batch is split across
processes, and bit-identical between the kernel and the PyTorch reference (``reference.py``, the
specification of each task).
"""
from . import philox, reference
from .api import (
    DEFAULT_PARAMS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TASK_ID,
    TASKS,
    corrupt,
    pixels_to_unit,
    prepare_batch,
    prepare_batch_reference,
)
from .reference import SAMPLE_TASKS, CorruptionPlan, make_plan

__all__ = [
    "corrupt",
    "prepare_batch",
    "prepare_batch_reference",
    "pixels_to_unit",
    "make_plan",
    "CorruptionPlan",
    "TASKS",
    "SAMPLE_TASKS",
    "TASK_ID",
    "DEFAULT_PARAMS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "philox",
    "reference",
]
