"""Input preprocessing fitted on the training split only, and saved with the run.

A ``Preprocessor`` is fitted on the training rows of one input block, transforms every split (and,
at prediction time, new inputs) into a tensor, and round-trips through JSON (``to_dict`` /
``PREPROCESSORS.get(kind).from_dict``) so a run folder can rebuild it. Built-in kinds:
``standardize`` (numeric features and images) and ``categories`` (categorical columns: a
vocabulary per column built on train, code 0 reserved for unknown or missing values).
Other modalities (a text tokenizer, say) register their own.

Inputs are a tensor or a dict of named tensors (``Inputs``); the helpers here index, move and
count either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, Union

import numpy as np
import torch
from torch import Tensor

from polytask.errors import DataError
from polytask.registry import Registry

Inputs = Union[Tensor, dict[str, Tensor]]  # noqa: UP007 (a runtime alias)

PREPROCESSORS: Registry = Registry("preprocessor")


def take_inputs(inputs: Inputs, index: Tensor) -> Inputs:
    """Rows ``index`` of a tensor or of every tensor of a dict."""
    if isinstance(inputs, dict):
        return {k: v[index] for k, v in inputs.items()}
    return inputs[index]


def inputs_to(inputs: Inputs, device: torch.device | str) -> Inputs:
    """``inputs`` on ``device`` (non-blocking)."""
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


def num_rows(inputs: Inputs) -> int:
    if isinstance(inputs, dict):
        return int(next(iter(inputs.values())).shape[0])
    return int(inputs.shape[0])


class Preprocessor(Protocol):
    """Fitted on training rows; turns raw values into a tensor; saved as JSON. Optionally,
    ``spec() -> dict`` describes the output for encoders (merged by ``input_spec``)."""

    kind: ClassVar[str]

    def fit(self, values: Any) -> None: ...
    def transform(self, values: Any) -> Tensor: ...
    def to_dict(self) -> dict[str, Any]: ...


@PREPROCESSORS.register("standardize", "per-feature (x - mean) / std, fitted on train")
class Standardizer:
    """Per-feature ``(x - mean) / std`` fitted on the training split; constant features keep
    std 1.

    Example:
        >>> s = Standardizer()
        >>> s.fit(np.array([[1.0], [3.0]]))
        >>> s.transform(np.array([[2.0], [5.0]])).tolist()
        [[0.0], [3.0]]
    """

    kind: ClassVar[str] = "standardize"

    def __init__(self, mean: Tensor | None = None, std: Tensor | None = None) -> None:
        self.mean = mean
        self.std = std

    def fit(self, values: Any) -> None:
        x = torch.as_tensor(np.asarray(values, dtype=np.float64))
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(dim=0)
        std = flat.std(dim=0, correction=0)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        self.mean = mean.float().reshape(x.shape[1:])
        self.std = std.float().reshape(x.shape[1:])

    def transform(self, values: Any) -> Tensor:
        if self.mean is None or self.std is None:
            raise DataError("standardize: transform before fit")
        x = torch.as_tensor(np.asarray(values, dtype=np.float32))
        return (x - self.mean) / self.std

    def to_dict(self) -> dict[str, Any]:
        assert self.mean is not None and self.std is not None
        return {
            "kind": self.kind,
            "shape": list(self.mean.shape),
            "mean": self.mean.reshape(-1).tolist(),
            "std": self.std.reshape(-1).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Standardizer:
        shape = tuple(d["shape"])
        return cls(torch.tensor(d["mean"]).reshape(shape), torch.tensor(d["std"]).reshape(shape))


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@PREPROCESSORS.register("categories", "a vocabulary per categorical column, unknown → 0")
class CategoryVocabulary:
    """Codes for categorical columns: per column, the values seen in the training split get codes
    ``1..n`` (in sorted order of their text); unknown or missing values get the reserved code 0.
    ``cardinalities`` (n + 1 per column) size the embedding tables.

    Example:
        >>> v = CategoryVocabulary(["color"])
        >>> v.fit(np.array([["red"], ["blue"], ["red"]], dtype=object))
        >>> v.transform(np.array([["blue"], ["green"], [None]], dtype=object)).flatten().tolist()
        [1, 0, 0]
        >>> v.cardinalities
        [3]
    """

    kind: ClassVar[str] = "categories"

    def __init__(self, columns: Sequence[str], vocab: list[list[str]] | None = None) -> None:
        self.columns = list(columns)
        self.vocab = vocab or []

    @property
    def cardinalities(self) -> list[int]:
        return [len(v) + 1 for v in self.vocab]

    def fit(self, values: Any) -> None:
        array = np.asarray(values, dtype=object).reshape(len(values), -1)
        if array.shape[1] != len(self.columns):
            raise DataError(f"categories: {array.shape[1]} columns for names {self.columns}")
        self.vocab = [
            sorted({str(v) for v in array[:, j] if not _is_missing(v)})
            for j in range(array.shape[1])
        ]

    def transform(self, values: Any) -> Tensor:
        array = np.asarray(values, dtype=object).reshape(len(values), -1)
        codes = np.zeros(array.shape, dtype=np.int64)
        for j, vocab in enumerate(self.vocab):
            index = {v: i + 1 for i, v in enumerate(vocab)}
            codes[:, j] = [0 if _is_missing(v) else index.get(str(v), 0) for v in array[:, j]]
        return torch.as_tensor(codes)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "columns": self.columns, "vocab": self.vocab}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CategoryVocabulary:
        return cls(d["columns"], d["vocab"])


def preprocessor_from_dict(d: dict[str, Any]) -> Preprocessor:
    """Rebuild a saved preprocessor."""
    return PREPROCESSORS.get(d["kind"]).from_dict(d)  # type: ignore[no-any-return]


def input_spec(inputs: Inputs, preprocessors: dict[str, Preprocessor]) -> Any:
    """What an encoder needs to know of its input: the per-sample shape of a tensor, or per key
    of a dict the shape (and, for categorical codes, the ``cardinalities``).

    A preprocessor may describe its output further with an optional ``spec() -> dict`` method
    (JSON values only; a text tokenizer gives its ``vocab_size``, an audio block its
    ``sample_rate``): its entries are merged into the block's entry.

    Example:
        >>> input_spec({"x": torch.zeros(2, 3)}, {})
        {'x': {'shape': [3]}}
    """
    if not isinstance(inputs, dict):
        return tuple(int(s) for s in inputs.shape[1:])
    spec: dict[str, Any] = {}
    for key, tensor in inputs.items():
        entry: dict[str, Any] = {"shape": [int(s) for s in tensor.shape[1:]]}
        pre = preprocessors.get(key)
        if isinstance(pre, CategoryVocabulary):
            entry["cardinalities"] = pre.cardinalities
            entry["columns"] = pre.columns
        describe = getattr(pre, "spec", None)
        if callable(describe):
            entry.update(describe())
        spec[key] = entry
    return spec
