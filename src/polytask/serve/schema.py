"""What the HTTP service takes and returns, from the run itself: input fields with the run's real
column names and types, the tasks with their output columns, and the pydantic models built from
them (so that the OpenAPI schema shows clients the real field names and types).

Input fields are of four kinds:

- ``number``: a numeric feature (a finite JSON number; NaN and infinities are refused);
- ``category``: a categorical column (string, number, boolean or ``null``; a value not seen in
  training, or ``null``, is the "unknown" category, as in training);
- ``text``: a text block (a string);
- ``tensor``: an image or audio block, one flat list of numbers per row (the block's shape,
  flattened); optional (``null``) where the model was trained with missing modalities.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, create_model

from polytask.data.files import FLOAT32_MAX
from polytask.errors import DataError
from polytask.serve.onnx_runtime import DENSE_KINDS, PRESENT_SUFFIX

FieldKind = Literal["number", "category", "text", "tensor"]

#: the field name of a model's whole input when the run has no feature names (images)
WHOLE_INPUT = "inputs"


@dataclass(frozen=True)
class InputField:
    """One input column of a request row."""

    name: str
    kind: FieldKind
    #: a tensor field's per-row shape (its JSON value is the flattened list)
    shape: tuple[int, ...] = ()
    #: may be ``null`` or absent (categories; modalities the model was trained to miss)
    optional: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def describe(self) -> dict[str, Any]:
        """JSON description for ``GET /metadata``."""
        entry: dict[str, Any] = {
            "name": self.name,
            "type": self.kind,
            "required": not self.optional,
        }
        if self.kind == "tensor":
            entry["shape"] = list(self.shape)
        return entry


@dataclass(frozen=True)
class OutputTask:
    """One task of the model and the response columns it fills."""

    name: str
    kind: str
    num_classes: int
    columns: tuple[str, ...]
    classes: tuple[int, ...] = field(default=())

    def describe(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "columns": list(self.columns),
        }
        if self.kind in ("multiclass", "segmentation"):
            entry["classes"] = list(self.classes)
        return entry


def output_task(name: str, kind: str, num_classes: int) -> OutputTask:
    """A task's response columns, named as ``polytask predict`` names them: the task name, or
    ``task_i`` per output for multilabel and multi-output regression tasks."""
    many = kind not in ("multiclass", *DENSE_KINDS) and num_classes > 1
    columns = tuple(f"{name}_{i}" for i in range(num_classes)) if many else (name,)
    classes = tuple(range(num_classes)) if kind in ("multiclass", "segmentation") else ()
    return OutputTask(name, kind, num_classes, columns, classes)


def input_fields(
    input_shape: Any,
    feature_names: Sequence[str] | None,
    categorical_names: Sequence[str] | None,
    text_blocks: Sequence[str] = (),
) -> list[InputField]:
    """A run's input fields from its metadata (``input_shape``, feature and categorical names)
    and the names of its text blocks (blocks with a tokenizer)."""
    if not isinstance(input_shape, Mapping):
        if feature_names is not None:
            return [InputField(name, "number") for name in feature_names]
        return [InputField(WHOLE_INPUT, "tensor", tuple(int(s) for s in input_shape))]
    fields: list[InputField] = []
    for block, spec in input_shape.items():
        if block.endswith(PRESENT_SUFFIX):
            continue
        optional = block + PRESENT_SUFFIX in input_shape
        if block == "numeric":
            fields += [InputField(name, "number") for name in feature_names or []]
        elif block == "categorical":
            fields += [
                InputField(name, "category", optional=True) for name in categorical_names or []
            ]
        elif block in text_blocks:
            fields.append(InputField(block, "text", optional=optional))
        else:
            shape = tuple(int(s) for s in spec.get("shape", ()))
            fields.append(InputField(block, "tensor", shape, optional=optional))
    return fields


# ---------------------------------------------------------------------- pydantic models
#: a number the model can take: finite, and within float32's range (beyond it a cast gives
#: infinity)
_NUMBER = Annotated[float, Strict(), Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
_CATEGORY = Union[  # noqa: UP007 (compared as text, as in training: 3 is "3", 3.5 is "3.5")
    Annotated[str, Strict()], Annotated[int, Strict()], Annotated[float, Strict()], bool, None
]


def _annotation(spec: InputField) -> Any:
    if spec.kind == "number":
        return _NUMBER
    if spec.kind == "category":
        return _CATEGORY
    if spec.kind == "text":
        kind: Any = Annotated[str, Strict()]
    else:
        kind = Annotated[list[_NUMBER], Field(min_length=spec.size, max_length=spec.size)]
    return kind | None if spec.optional else kind


def attribute(position: int) -> str:
    """The Python attribute of the ``position``-th field of a row model (the real column name is
    its alias, so any column name works, even one that is not an identifier)."""
    return f"f{position}"


def row_model(fields: Sequence[InputField]) -> type[BaseModel]:
    """The pydantic model of one request row: the real column names (as aliases), their types;
    unknown fields are refused (a misspelt column would otherwise be ignored)."""
    definitions: dict[str, Any] = {}
    for position, spec in enumerate(fields):
        default = None if spec.optional else ...
        description = _description(spec)
        definitions[attribute(position)] = (
            _annotation(spec),
            Field(default, alias=spec.name, description=description),
        )
    config = ConfigDict(extra="forbid", populate_by_name=False, title="Row")
    return create_model("Row", __config__=config, **definitions)  # type: ignore[call-overload,no-any-return]


def _description(spec: InputField) -> str:
    if spec.kind == "number":
        return "numeric feature: a finite number (within float32's range)"
    if spec.kind == "category":
        return "categorical column; a value not seen in training, or null, is 'unknown'"
    if spec.kind == "text":
        return "text" + (" (null: the modality is missing)" if spec.optional else "")
    shape = "×".join(map(str, spec.shape))
    missing = "; null: the modality is missing" if spec.optional else ""
    return f"tensor {shape}, flattened to {spec.size} numbers{missing}"


def request_model(row: type[BaseModel], task_names: Sequence[str]) -> Any:
    """The body of ``POST /predict``: ``{"rows": [...], "tasks": [...]}`` or a bare list of
    rows (records). Validation errors carry the tag ``object`` or ``records`` in their location
    (see ``error_location``)."""
    task = Literal[tuple(task_names)]  # type: ignore[valid-type]
    request = create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        rows=(list[row], Field(min_length=1, description="the input rows")),  # type: ignore[valid-type]
        tasks=(  # type: ignore[arg-type]
            list[task] | None,  # type: ignore[valid-type]
            Field(None, description="only these tasks' columns (default: every task)"),
        ),
    )
    return Annotated[
        Union[  # noqa: UP007
            Annotated[request, Tag("object")],
            Annotated[list[row], Field(min_length=1), Tag("records")],  # type: ignore[valid-type]
        ],
        Discriminator(_body_shape),
    ]


def _body_shape(value: Any) -> str | None:
    if isinstance(value, list):
        return "records"
    if isinstance(value, (dict, BaseModel)):
        return "object"
    return None


def response_model(tasks: Sequence[OutputTask]) -> type[BaseModel]:
    """The body of a prediction response (for the OpenAPI schema): one object per input row
    with the prediction columns, and the class probabilities of multiclass tasks."""
    columns: dict[str, Any] = {}
    probabilities: dict[str, Any] = {}
    for task in tasks:
        kind: Any = {"multiclass": int, "segmentation": list[list[int]]}.get(task.kind, float)
        if task.kind in ("depth", "normals"):
            kind = list[list[float | None]] if task.kind == "depth" else list[list[list[float]]]
        description = {
            "multiclass": "the most probable class",
            "binary": "the probability of 1",
            "multilabel": "the probability of the label",
            "regression": "the value, in the units of the training labels",
            "segmentation": "the most probable class of each pixel, [height][width]",
            "depth": "the depth of each pixel, [height][width], in the training labels' units",
            "normals": "the unit surface normal of each pixel, [3][height][width]",
        }.get(task.kind, task.kind)
        for column in task.columns:
            columns[attribute(len(columns))] = (
                kind | None,
                Field(None, alias=column, description=description),
            )
        if task.kind == "multiclass":
            probabilities[attribute(len(probabilities))] = (
                list[float] | None,
                Field(None, alias=task.name, description="each class's probability"),
            )
    prediction = create_model("Prediction", **columns)
    probability = create_model("ClassProbabilities", **probabilities)
    return create_model(  # type: ignore[call-overload,no-any-return]
        "PredictResponse",
        model_version=(str, ...),
        predictions=(list[prediction], ...),  # type: ignore[valid-type]
        probabilities=(list[probability] | None, None),  # type: ignore[valid-type]
    )


# ---------------------------------------------------------------------- rows → columns
def columns_from_rows(rows: Sequence[BaseModel], fields: Sequence[InputField]) -> dict[str, Any]:
    """Validated rows → one column per field: float32 ``[N]`` (numbers), objects ``[N]``
    (categories, texts; ``None`` where missing), float32 ``[N, *shape]`` (tensors) or, for an
    optional tensor with missing rows, a list of arrays and ``None``."""
    columns: dict[str, Any] = {}
    for position, spec in enumerate(fields):
        values = [getattr(row, attribute(position)) for row in rows]
        columns[spec.name] = column_array(values, spec)
    return columns


def column_array(values: Sequence[Any], spec: InputField) -> Any:
    """One field's values (as JSON gives them) as the column ``columns_from_rows`` describes."""
    if spec.kind == "number":
        return np.asarray(values, dtype=np.float32)
    if spec.kind != "tensor":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array
    if any(v is None for v in values):
        return [
            None if v is None else np.asarray(v, np.float32).reshape(spec.shape) for v in values
        ]
    return np.asarray(values, dtype=np.float32).reshape(len(values), *spec.shape)


def error_location(loc: Sequence[Any]) -> tuple[int | None, str]:
    """``(row, field)`` of a pydantic error location in a request: ``("body", "object",
    "rows", 3, "age")`` → ``(3, "age")``; ``("body", "records", 0)`` → ``(0, "")``;
    ``("query", "tasks", 1)`` → ``(None, "tasks[1]")``.

    >>> error_location(("body", "records", 2, "age"))
    (2, 'age')
    >>> error_location(("body", "object", "tasks", 0))
    (None, 'tasks[0]')
    """
    parts = list(loc)
    if parts[:1] != ["body"]:
        return None, _dotted(parts[1:] if parts[:1] in (["query"], ["header"]) else parts)
    parts = parts[1:]
    shape = parts.pop(0) if parts[:1] in (["object"], ["records"]) else None
    if shape == "object" and parts[:1] == ["rows"]:
        parts = parts[1:]
    elif shape != "records":
        return None, _dotted(parts) or "body"
    if parts and isinstance(parts[0], int):
        return parts[0], _dotted(parts[1:])
    return None, _dotted(["rows", *parts])


def _dotted(parts: Sequence[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def check_columns(names: Sequence[str], fields: Sequence[InputField], source: str) -> None:
    """``DataError`` naming the required fields missing from a table's column ``names``."""
    present = set(map(str, names))
    missing = [f.name for f in fields if not f.optional and f.name not in present]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(map(repr, missing))}; the model needs "
            f"{', '.join(f.name for f in fields)}"
        )
