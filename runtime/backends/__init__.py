"""Backends that run exported artifacts behind one :class:`Runner` interface.

Importing this package registers every built-in backend; each backend imports its heavy runtime
(onnxruntime, openvino, tensorrt) only when a runner is activated, so this import is torch-free and
needs numpy alone.
"""
from __future__ import annotations

from runtime.backends.base import BACKENDS, InputSpec, Runner, open_runner
from runtime.backends import onnxrt  # noqa: F401  (registers "onnxruntime")
from runtime.backends import tensorrt  # noqa: F401  (registers "tensorrt")
from runtime.backends import openvino  # noqa: F401  (registers "openvino")

__all__ = ["BACKENDS", "InputSpec", "Runner", "open_runner"]
