"""The ``tabular`` encoder: embeddings of categorical columns, numeric features, optional feature
crosses, then an MLP.

Its input is what ``build_bundle`` makes of a table with categorical columns: a dict
``{"numeric": [B, F] floats (standardised on train), "categorical": [B, C] int64 codes}`` where
code 0 is the reserved *unknown* code (values not seen in training, missing values) and
``1..n`` are the training vocabulary (``polytask.data.preprocess.CategoryVocabulary``). A plain
tensor ``[B, F]`` (numeric features only) is accepted as well.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.encoders import ENCODERS, mlp_layers

__all__ = [
    "TabularEncoder",
    "TabularInput",
    "auto_embedding_dim",
    "cross_index",
    "cross_table_size",
]

#: multiplier of the hash that maps a tuple of codes to a cross bucket (a large prime)
_HASH_PRIME = 1_000_003
_HASH_MODULUS = 2_147_483_647  # 2^31 - 1: products stay inside int64


def auto_embedding_dim(cardinality: int) -> int:
    """The ``"auto"`` embedding width of a column with ``cardinality`` codes:
    ``min(16, round(1.6 * cardinality ** 0.56))``, at least 1 (the rule of thumb of fast.ai's
    tabular models, capped at 16).

    Example:
        >>> [auto_embedding_dim(n) for n in (2, 10, 100, 10_000)]
        [2, 6, 16, 16]
    """
    return max(1, min(16, round(1.6 * cardinality**0.56)))


def cross_index(codes: Tensor, cardinalities: Sequence[int], buckets: int) -> Tensor:
    """The row of a cross's embedding table for each sample: ``codes`` ``[B, k]`` (one column
    per crossed column) → ``[B]`` int64.

    When the crossed columns have at most ``buckets`` combinations in all, the index is the exact
    mixed-radix number of the combination (no collision, the table has one row per combination);
    otherwise the combination is hashed into ``buckets`` rows (``h = (h · 1000003 + code) mod
    (2^31 - 1)`` column by column, then ``h mod buckets``).

    Example:
        >>> cross_index(torch.tensor([[1, 2], [0, 0]]), [3, 4], buckets=100).tolist()
        [6, 0]
    """
    combinations = math.prod(int(c) for c in cardinalities)
    index = torch.zeros(codes.shape[0], dtype=torch.int64, device=codes.device)
    if combinations <= buckets:
        for j, card in enumerate(cardinalities):
            index = index * int(card) + codes[:, j]
        return index
    for j in range(codes.shape[1]):
        index = (index * _HASH_PRIME + codes[:, j]) % _HASH_MODULUS
    return index % buckets


def cross_table_size(cardinalities: Sequence[int], buckets: int) -> int:
    """Rows of a cross's embedding table: its number of combinations, at most ``buckets``."""
    return min(math.prod(int(c) for c in cardinalities), buckets)


def _parse_spec(input_shape: Any) -> tuple[int, list[int], list[str]]:
    """(number of numeric features, cardinalities, categorical column names) of an input spec."""
    if not isinstance(input_shape, Mapping):
        try:
            shape = [int(d) for d in input_shape]
        except (TypeError, ValueError):
            raise ConfigError(
                "tabular encoder: input_shape must be a shape such as (F,) or a dict of blocks "
                f"'numeric' and 'categorical', found {input_shape!r}"
            ) from None
        return math.prod(shape), [], []
    unknown = sorted(set(input_shape) - {"numeric", "categorical"})
    if unknown:
        raise ConfigError(
            f"tabular encoder: reads the input blocks 'numeric' and 'categorical', found "
            f"{', '.join(repr(k) for k in unknown)}"
        )
    numeric = input_shape.get("numeric")
    num_features = math.prod(int(d) for d in numeric["shape"]) if numeric else 0
    categorical = input_shape.get("categorical")
    if not categorical:
        return num_features, [], []
    cardinalities = [int(c) for c in categorical.get("cardinalities", [])]
    width = math.prod(int(d) for d in categorical["shape"])
    if len(cardinalities) != width:
        raise ConfigError(
            f"tabular encoder: the categorical block has {width} columns but "
            f"{len(cardinalities)} cardinalities (build it with the 'categories' preprocessor)"
        )
    columns = [str(c) for c in categorical.get("columns") or []]
    if len(columns) != width:
        columns = [f"cat{j}" for j in range(width)]
    return num_features, cardinalities, columns


def _embedding_width(value: int | str, cardinality: int, owner: str) -> int:
    if value == "auto":
        return auto_embedding_dim(cardinality)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{owner}: embedding width must be 'auto' or an integer >= 1, found {value!r}"
        )
    return value


class TabularInput(nn.Module):
    """The input layer of the ``tabular`` encoder: ``x -> [B, out_features]``, the numeric
    features, then one embedding per categorical column, then one per cross (see
    ``TabularEncoder``)."""

    cardinalities_tensor: Tensor

    def __init__(
        self,
        *,
        num_numeric: int,
        cardinalities: Sequence[int],
        widths: Sequence[int],
        crosses: Sequence[Sequence[int]],
        cross_widths: Sequence[int],
        cross_buckets: int,
    ) -> None:
        super().__init__()
        self.num_numeric = num_numeric
        self.cardinalities = [int(c) for c in cardinalities]
        self.register_buffer(
            "cardinalities_tensor",
            torch.tensor(self.cardinalities, dtype=torch.int64),
            persistent=False,
        )
        self.embeddings = nn.ModuleList(
            nn.Embedding(card, width) for card, width in zip(cardinalities, widths, strict=True)
        )
        self.crosses = [list(c) for c in crosses]
        self.cross_buckets = cross_buckets
        sizes = [
            cross_table_size([self.cardinalities[j] for j in c], cross_buckets) for c in crosses
        ]
        self.cross_embeddings = nn.ModuleList(
            nn.Embedding(size, width) for size, width in zip(sizes, cross_widths, strict=True)
        )
        self.out_features = num_numeric + sum(widths) + sum(cross_widths)

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        if isinstance(x, Mapping):
            numeric, codes = x.get("numeric"), x.get("categorical")
        else:
            numeric, codes = x, None
        parts: list[Tensor] = []
        if self.num_numeric:
            if numeric is None:
                raise ConfigError("tabular encoder: the input has no 'numeric' block")
            flat = numeric.flatten(1)
            parts.append(flat if flat.is_floating_point() else flat.float())
        if self.cardinalities:
            if codes is None:
                raise ConfigError("tabular encoder: the input has no 'categorical' block")
            codes = codes.long()
            codes = torch.where(
                (codes >= 0) & (codes < self.cardinalities_tensor), codes, torch.zeros_like(codes)
            )
            parts += [table(codes[:, j]) for j, table in enumerate(self.embeddings)]
            for cols, table in zip(self.crosses, self.cross_embeddings, strict=True):
                cards = [self.cardinalities[j] for j in cols]
                parts.append(table(cross_index(codes[:, cols], cards, self.cross_buckets)))
        return torch.cat(parts, dim=1)


def _check_tabular(
    columns: Sequence[str],
    per_column: Mapping[str, int],
    crosses: Sequence[Sequence[str]],
    *,
    cross_buckets: int,
    dropout: float,
    hidden: Sequence[int],
    owner: str,
) -> list[list[int]]:
    """The column positions of each cross; one ``ConfigError`` lists every problem with the
    tabular encoder's parameters."""
    problems: list[str] = []
    if cross_buckets < 1:
        problems.append(f"cross_buckets must be >= 1, found {cross_buckets}")
    if not 0.0 <= dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), found {dropout}")
    if any(int(h) < 1 for h in hidden):
        problems.append(f"hidden widths must be >= 1, found {list(hidden)}")
    stray = sorted(set(per_column) - set(columns))
    if stray:
        problems.append(
            f"embedding_dims names unknown column(s) {', '.join(map(repr, stray))}; "
            f"categorical columns: {', '.join(columns) or 'none'}"
        )
    position = {name: j for j, name in enumerate(columns)}
    cross_columns: list[list[int]] = []
    for cross in crosses:
        names = [cross] if isinstance(cross, str) else list(cross)
        missing = [n for n in names if n not in position]
        if missing:
            problems.append(
                f"cross {names} names unknown column(s) {', '.join(map(repr, missing))}; "
                f"categorical columns: {', '.join(columns) or 'none'}"
            )
        elif len(names) < 2:
            problems.append(f"cross {names} needs at least two columns")
        else:
            cross_columns.append([position[n] for n in names])
    if problems:
        raise ConfigError(f"{owner}: " + "; ".join(problems))
    return cross_columns


@ENCODERS.register(
    "tabular", "categorical embeddings (unknown → 0), numeric features and crosses, then an MLP"
)
class TabularEncoder(nn.Module):
    """Embeddings for categorical columns, numeric features and hashed feature crosses,
    concatenated and fed to an MLP (the input layer of Wide & Deep, Cheng et al., DLRS 2016,
    without the wide part; crosses as in its cross-product transformations).

    * Each categorical column gets an ``nn.Embedding(cardinality, dim)`` where row 0 is the
      unknown code; ``embedding_dim`` is ``"auto"`` (``auto_embedding_dim``) or an integer, and
      ``embedding_dims`` overrides it per column (``{column: width}``). Codes outside a table
      (``>= cardinality``) are read as unknown (0).
    * Numeric features enter as they are (``build_bundle`` standardises them on train).
    * ``crosses`` lists tuples of categorical column names; each cross gets its own embedding of
      the combination of its columns' codes (``cross_index``: exact up to ``cross_buckets``
      combinations, hashed into ``cross_buckets`` rows beyond), of width ``cross_dim``.
    * ``hidden`` widths of the MLP (``[]``: no MLP, the output is ``embed(x)``), with
      ``dropout``, ``activation`` and ``batch_norm`` as in the ``mlp`` encoder.

    ``embed(x)`` returns the concatenated input layer ``[B, in_features]`` (numeric features,
    then column embeddings, then cross embeddings; the ``input_layer`` module) — what the MLP
    reads and what the gates of expert models (``mmoe``, ``cgc``, ``ple``) read for dict inputs.
    ``stages()`` splits the encoder into the input layer with the first MLP block, then one
    stage per further block (for layered architectures such as cross-stitch).

    Example:
        >>> spec = {"numeric": {"shape": [2]},
        ...         "categorical": {"shape": [2], "cardinalities": [4, 3],
        ...                         "columns": ["city", "device"]}}
        >>> enc = TabularEncoder(spec, hidden=[8], crosses=[["city", "device"]])
        >>> x = {"numeric": torch.randn(5, 2), "categorical": torch.randint(0, 3, (5, 2))}
        >>> enc(x).shape, enc.embed(x).shape, enc.in_features
        (torch.Size([5, 8]), torch.Size([5, 14]), 14)
    """

    def __init__(
        self,
        input_shape: Any,
        *,
        hidden: Sequence[int] = (128, 64),
        embedding_dim: int | str = "auto",
        embedding_dims: Mapping[str, int] | None = None,
        crosses: Sequence[Sequence[str]] = (),
        cross_buckets: int = 1000,
        cross_dim: int | str = "auto",
        dropout: float = 0.0,
        activation: str = "relu",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        owner = "tabular encoder"
        num_numeric, cardinalities, columns = _parse_spec(input_shape)
        per_column = dict(embedding_dims or {})
        cross_columns = _check_tabular(
            columns,
            per_column,
            crosses,
            cross_buckets=cross_buckets,
            dropout=dropout,
            hidden=hidden,
            owner=owner,
        )
        if num_numeric == 0 and not cardinalities:
            raise ConfigError(f"{owner}: the input has neither numeric nor categorical features")

        widths = [
            _embedding_width(per_column.get(name, embedding_dim), card, owner)
            for name, card in zip(columns, cardinalities, strict=True)
        ]
        sizes = [
            cross_table_size([cardinalities[j] for j in c], cross_buckets) for c in cross_columns
        ]
        self.columns = columns
        self.input_layer = TabularInput(
            num_numeric=num_numeric,
            cardinalities=cardinalities,
            widths=widths,
            crosses=cross_columns,
            cross_widths=[_embedding_width(cross_dim, size, owner) for size in sizes],
            cross_buckets=cross_buckets,
        )
        self.in_features = self.input_layer.out_features
        blocks: list[nn.Module] = []
        width = self.in_features
        for h in hidden:
            blocks.append(
                mlp_layers(
                    width,
                    [int(h)],
                    dropout=dropout,
                    activation_name=activation,
                    batch_norm=batch_norm,
                )
            )
            width = int(h)
        self.body = nn.Sequential(*blocks)
        self.out_features = width

    def embed(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The input layer ``[B, in_features]``: numeric features, column embeddings, cross
        embeddings."""
        return cast(Tensor, self.input_layer(x))

    def stages(self) -> list[nn.Module]:
        """Consecutive stages whose composition is ``forward``: the input layer with the first
        MLP block, then each further block (the encoder's own modules, not copies)."""
        blocks = list(self.body)
        if not blocks:
            return [self.input_layer]
        return [nn.Sequential(self.input_layer, blocks[0]), *blocks[1:]]

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        return cast(Tensor, self.body(self.input_layer(x)))
