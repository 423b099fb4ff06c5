"""Uploaded CSV and Parquet tables → request rows, read as ``polytask predict`` reads files."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polytask.data.files import file_format, read_frame
from polytask.errors import DataError
from polytask.serve.schema import WHOLE_INPUT, InputField, check_columns

if TYPE_CHECKING:
    import pandas as pd


def read_upload(filename: str | None, content: bytes) -> pd.DataFrame:
    """The table in an uploaded file, its format from the file name (``.csv``, ``.parquet``;
    CSV when there is no name). ``DataError`` naming the upload when it cannot be read, has no
    rows or has a column name twice."""
    name = Path(filename or "upload.csv").name or "upload.csv"
    kind = file_format(Path(name))
    with tempfile.TemporaryDirectory(prefix="polytask-upload-") as folder:
        path = Path(folder) / f"upload.{kind}"
        path.write_bytes(content)
        try:
            frame = read_frame(path)
        except DataError as exc:  # name the upload, not the temporary file
            raise DataError(str(exc).replace(str(path), name)) from None
    if len(frame) == 0:
        raise DataError(f"{name}: no rows to predict")
    return frame


def upload_records(frame: pd.DataFrame, fields: Sequence[InputField], source: str) -> list[Any]:
    """The rows of an uploaded table as JSON-like records of the input fields (empty cells as
    ``null``), ready for the row model's validation. A model without feature names (images)
    reads every column in order, as ``polytask predict`` does; other tensor fields cannot come
    from a table."""
    if len(fields) == 1 and fields[0].name == WHOLE_INPUT and fields[0].kind == "tensor":
        if frame.shape[1] != fields[0].size:
            raise DataError(
                f"{source}: the model takes {fields[0].size} input columns (shape "
                f"{list(fields[0].shape)} flattened), found {frame.shape[1]}"
            )
        values = frame.astype(object).where(frame.notna(), None).to_numpy().tolist()
        return [{WHOLE_INPUT: row} for row in values]
    tensors = [f.name for f in fields if f.kind == "tensor"]
    if tensors:
        raise DataError(
            f"{source}: field(s) {', '.join(map(repr, tensors))} are tensors, which a table "
            "cannot hold; send them as JSON to POST /predict"
        )
    check_columns(list(frame.columns), fields, source)
    import pandas as pd

    table = pd.DataFrame({f.name: _cells(frame[f.name], f) for f in fields if f.name in frame})
    return table.where(table.notna(), None).to_dict("records")  # type: ignore[no-any-return]


def _cells(values: pd.Series, spec: InputField) -> pd.Series:
    """A column's cells as objects; a number column's cells as numbers where they parse (one
    text cell makes a CSV reader keep the whole column as text) and as found where they do
    not, for the row model to name."""
    import pandas as pd

    if spec.kind != "number" or pd.api.types.is_numeric_dtype(values):
        return values.astype(object)
    numeric = pd.to_numeric(values, errors="coerce")
    return numeric.astype(object).where(numeric.notna() | values.isna(), values)
