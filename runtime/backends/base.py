"""The backend interface: a runner that opens one artifact lazily and checks inputs before running.

A :class:`Runner` follows the loader + runner pattern (style.md): constructing it only validates the
options; entering it as a context manager loads the artifact; leaving it releases the backend's
resources. ``infer`` checks the input against the model's :class:`InputSpec` before the backend
sees it, so a wrong size or dtype is one clear :class:`~runtime.errors.BckdError`, never a backend
stack trace. Concrete runners register in :data:`BACKENDS` and are built with :func:`open_runner`.
"""
from __future__ import annotations

import abc
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence, Union

import numpy as np

from runtime.card import card_path, read_card
from runtime.errors import BckdError
from runtime.registry import Registry, unknown_name_message

# Letters shown for dynamic dims of an NCHW input in error messages.
_DYNAMIC_LETTERS = ("N", "C", "H", "W")


# One array for a single-input model, or {input name: array} for any model.
Feed = Union[np.ndarray, dict[str, np.ndarray]]


@dataclass(frozen=True)
class InputSpec:
    """Name, shape (None for a dynamic dim) and dtype of a model input."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    def render(self) -> str:
        """The shape with dynamic dims as letters, e.g. '(N, 3, H, W)'."""
        dims = [
            str(d) if d is not None else (_DYNAMIC_LETTERS[i] if i < len(_DYNAMIC_LETTERS) else "?")
            for i, d in enumerate(self.shape)
        ]
        return "(" + ", ".join(dims) + ")"


def load_card_if_any(artifact: str | os.PathLike) -> dict[str, Any] | None:
    """The artifact's model card, or None for a bare artifact (e.g. a third-party ONNX file)."""
    return read_card(artifact) if card_path(artifact).is_file() else None


class Runner(abc.ABC):
    """Runs one artifact on one backend; use as ``with open_runner(...) as r: r.infer(x)``.

    The attributes ``backend``, ``device``, ``precision``, ``threads`` and ``artifact`` are recorded
    with every measurement (see :meth:`describe`).
    """

    backend: str = ""
    # True where infer() may run from several threads at once on one runner (the backend's session
    # is thread-safe); the throughput profiler then keeps several requests in flight with threads.
    concurrent_infer: bool = False

    def __init__(self, artifact: str | os.PathLike, *, card: dict[str, Any] | None = None) -> None:
        self.artifact = Path(artifact)
        # An explicit card wins; otherwise the sidecar is read when present.
        self.card = card if card is not None else load_card_if_any(self.artifact)
        self.precision: str = str((self.card or {}).get("precision", "fp32"))
        self.device: str = "cpu"
        self.threads: int | None = None
        self._active = False

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.deactivate()

    @property
    def active(self) -> bool:
        return self._active

    def activate(self) -> None:
        """Load the artifact (idempotent)."""
        if not self._active:
            if not self.artifact.is_file():
                raise BckdError(f"model file {self.artifact} not found; check the path")
            self._load()
            self._active = True

    def deactivate(self) -> None:
        """Release the backend's resources (idempotent)."""
        if self._active:
            self._release()
            self._active = False

    # -- inference -----------------------------------------------------------------------------
    def run(self, x: Feed, *, check: bool = True) -> dict[str, np.ndarray]:
        """Every output of the model on ``x`` (NCHW), by output name, in the model's order.

        ``x`` is one array for a single-input model or ``{input name: array}`` for any model
        (a multi-input one needs the dict). ``check=False`` skips validation for timed loops.
        """
        self._require_active()
        if check:
            self.check_input(x)
        return self._run_named(x)

    def infer(self, x: Feed, *, check: bool = True) -> np.ndarray:
        """The model's first (for a segmentor: only) output on ``x``; all outputs are computed."""
        self._require_active()
        if check:
            self.check_input(x)
        if len(self.output_names) == 1:
            return self._run(x)
        return self._run_named(x)[self.output_names[0]]

    @property
    def output_names(self) -> list[str]:
        """The model's output names in order; valid once active."""
        self._require_active()
        return list(self._output_names())

    def _output_names(self) -> Sequence[str]:
        """Single-output backends name their one output ``output``."""
        return ("output",)

    def _run_named(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs by name; single-output backends wrap :meth:`_run`."""
        return {self.output_names[0]: self._run(x)}

    @property
    def input_specs(self) -> list[InputSpec]:
        """Every model input in order; valid once active (single-input backends: one)."""
        return [self.input_spec]

    def check_input(self, x: Feed) -> None:
        """Raise a one-line BckdError if ``x`` does not fit the model input(s)."""
        self._require_active()
        if isinstance(x, dict):
            return self._check_feed(x)
        if len(self.input_specs) > 1:
            names = ", ".join(s.name for s in self.input_specs)
            raise BckdError(f"{self.artifact.name} has {len(self.input_specs)} inputs ({names}); "
                            "pass a dict {input name: array}")
        self._check_one(x, self.input_spec)

    def _check_feed(self, feed: dict[str, np.ndarray]) -> None:
        specs = {s.name: s for s in self.input_specs}
        missing, extra = sorted(set(specs) - set(feed)), sorted(set(feed) - set(specs))
        if missing or extra:
            raise BckdError(f"the feed for {self.artifact.name} "
                            + (f"lacks inputs {', '.join(missing)}" if missing else "")
                            + ("; " if missing and extra else "")
                            + (f"has unknown inputs {', '.join(extra)}" if extra else "")
                            + f" (the model's inputs: {', '.join(specs)})")
        for name, spec in specs.items():
            self._check_one(feed[name], spec)

    def _check_one(self, x: np.ndarray, spec: InputSpec) -> None:
        if not isinstance(x, np.ndarray):
            raise BckdError(f"input must be a numpy array, got {type(x).__name__}")
        if x.dtype != spec.dtype:
            raise BckdError(
                f"input dtype {x.dtype} does not match the model input '{spec.name}' "
                f"({spec.dtype}) from "
                f"{self.artifact.name}; convert with x.astype(np.{spec.dtype})"
            )
        if x.ndim != len(spec.shape):
            raise BckdError(
                f"input has {x.ndim} dimensions {tuple(x.shape)} but the model input "
                f"{spec.render()} from {self.artifact.name} has {len(spec.shape)}; "
                "pass a batch of NCHW images (add a batch axis with x[None])"
            )
        self._check_channels(x, spec)
        self._check_static_dims(x, spec)

    def _check_channels(self, x: np.ndarray, spec: InputSpec) -> None:
        if len(spec.shape) != 4 or spec.shape[-1] in (1, 3, 4) and spec.shape[1] not in (1, 3, 4):
            return  # not an image batch, or an NHWC one: the static-dims check covers it
        channels = spec.shape[1]
        if channels is None or x.shape[1] == channels:
            return
        hint = (
            "it looks like NHWC: transpose to NCHW with x.transpose(0, 3, 1, 2)"
            if x.shape[-1] == channels
            else f"pass {channels}-channel NCHW images"
        )
        raise BckdError(
            f"input shape {tuple(x.shape)} has {x.shape[1]} channels but the model input "
            f"{spec.render()} from {self.artifact.name} expects {channels}; {hint}"
        )

    def _check_static_dims(self, x: np.ndarray, spec: InputSpec) -> None:
        wrong = [i for i, d in enumerate(spec.shape) if d is not None and x.shape[i] != d]
        if not wrong:
            return
        raise BckdError(
            f"input shape {tuple(x.shape)} does not match the model input {spec.render()} from "
            f"{self.artifact.name}; {self._resize_hint(spec, wrong)}"
        )

    def _resize_hint(self, spec: InputSpec, wrong: list[int]) -> str:
        if len(spec.shape) == 4 and (2 in wrong or 3 in wrong) and None not in spec.shape[2:]:
            h, w = spec.shape[2], spec.shape[3]
            card_size = (self.card or {}).get("input_size")
            from_card = " (the card's input size)" if card_size and list(card_size) == [h, w] else ""
            return f"resize to {h}x{w}{from_card}"
        if 0 in wrong:
            return (
                f"the model has a fixed batch size of {spec.shape[0]}; "
                "re-export it with dynamic axes to run other batch sizes"
            )
        return "reshape the input to the model's static dims"

    def _require_active(self) -> None:
        if not self._active:
            raise RuntimeError(
                f"{type(self).__name__} is not active; use it as a context manager "
                "(with open_runner(...) as runner:) or call activate() first"
            )

    def describe(self) -> dict[str, Any]:
        """What to record with every measurement made through this runner."""
        return {
            "backend": self.backend,
            "device": self.device,
            "precision": self.precision,
            "threads": self.threads,
            "artifact": str(self.artifact),
        }

    # -- what a backend implements ------------------------------------------------------------
    @property
    @abc.abstractmethod
    def input_spec(self) -> InputSpec:
        """The model's (single) input; valid once active."""

    @abc.abstractmethod
    def _load(self) -> None:
        """Open the artifact and create the backend session."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Drop the backend session."""

    @abc.abstractmethod
    def _run(self, x: np.ndarray) -> np.ndarray:
        """Run the backend on an already-checked input."""


BACKENDS: Registry[type[Runner]] = Registry("backend")


def open_runner(backend: str, artifact: str | os.PathLike, **options: Any) -> Runner:
    """An inactive runner of the named backend for ``artifact``; enter it to load the model."""
    cls = BACKENDS.get(backend)
    valid = _option_names(cls)
    for name in options:
        if name not in valid:
            raise BckdError(unknown_name_message(f"option for backend {backend}", name, valid))
    return cls(artifact, **options)


def _option_names(cls: type[Runner]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
