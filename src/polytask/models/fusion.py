"""Encoders built from other encoders: ``fusion`` of per-modality encoders, and ``augmented``
(train-time image augmentation in front of any image encoder).

Named input blocks. A sample with several modalities is a dict input, one block per modality
(``{"image": ..., "audio": ..., "text": ...}``); ``input_shape`` is then the spec of
``polytask.data.preprocess.input_spec``: per block ``{"shape": [...]}`` plus what the block's
preprocessor adds (a tokenizer's ``vocab_size``, an audio block's ``sample_rate``).
``resolve_block`` lets a modality encoder take either that whole spec (it picks its block) or
one block's entry (what ``fusion`` hands it).

Missing modalities. A sample may lack a block. The convention: an optional block
``<block>_present`` (a **bool** array in the dataset, 1 = present; a float one would be
standardised) marks which samples carry ``<block>``; without it, a sample whose block is exactly
all zeros (an all-padding text, a silent waveform) counts as missing. ``fusion`` replaces a
missing block's input by zeros before its encoder (its raw values, NaN included, never enter the
computation), and its features by a learned "missing" vector (``concat``), a zero gate
(``gated``) or a masked attention key (``cross_attention``). One leak is inherent and
documented: in training mode a batch-normalised encoder's batch statistics include the zeroed
rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError, unknown_name
from polytask.models.augment import ImageAugment
from polytask.models.encoders import ENCODERS

PRESENT_SUFFIX = "_present"
FUSION_MODES = ("concat", "gated", "cross_attention")

__all__ = [
    "FUSION_MODES",
    "PRESENT_SUFFIX",
    "AugmentedEncoder",
    "FusionEncoder",
    "build_sub_encoder",
    "resolve_block",
]


def _is_block_entry(spec: Any) -> bool:
    return isinstance(spec, Mapping) and isinstance(spec.get("shape"), list | tuple)


def resolve_block(
    encoder: str, input_shape: Any, block: str | None, *, needs: Sequence[str] = ()
) -> tuple[str | None, dict[str, Any]]:
    """``(block name or None, block entry)`` for a modality encoder.

    ``input_shape`` is a per-sample shape (a tensor input), one block's entry
    (``{"shape": [...], ...}``), or a dict spec of named blocks; from a dict spec the encoder
    takes ``block`` or, when that is ``None``, the only block whose entry has every key of
    ``needs`` (``ConfigError`` lists the blocks otherwise).

    Example:
        >>> spec = {"text": {"shape": [8], "vocab_size": 50}, "x": {"shape": [3]}}
        >>> resolve_block("transformer", spec, None, needs=["vocab_size"])
        ('text', {'shape': [8], 'vocab_size': 50})
        >>> resolve_block("mlp", (4,), None)
        (None, {'shape': [4]})
    """
    if _is_block_entry(input_shape):
        return None, dict(input_shape)
    if not isinstance(input_shape, Mapping):
        return None, {"shape": [int(s) for s in input_shape]}
    blocks = {k: v for k, v in input_shape.items() if not k.endswith(PRESENT_SUFFIX)}
    if block is not None:
        if block not in input_shape:
            raise ConfigError(
                f"{encoder} encoder: no input block {block!r}; blocks: {', '.join(input_shape)}"
            )
        return block, dict(input_shape[block])
    fitting = [k for k, v in blocks.items() if all(key in v for key in needs)]
    if len(fitting) != 1:
        wanted = f" with {', '.join(needs)}" if needs else ""
        raise ConfigError(
            f"{encoder} encoder: the input has blocks {', '.join(input_shape)}; set its `block` "
            f"parameter to the one it reads ({len(fitting)} block(s){wanted})"
        )
    return fitting[0], dict(blocks[fitting[0]])


def pick(x: Tensor | Mapping[str, Tensor], block: str | None, encoder: str) -> Tensor:
    """Block ``block`` of a dict input (or the tensor itself)."""
    if isinstance(x, Mapping):
        if block is None or block not in x:
            raise ConfigError(f"{encoder} encoder: got a dict input without block {block!r}")
        return x[block]
    return x


def _entry(config: Any, where: str) -> tuple[str, dict[str, Any]]:
    if isinstance(config, str):
        return config, {}
    if not isinstance(config, Mapping) or "name" not in config:
        raise ConfigError(
            f"{where}: expected {{name: <encoder>, params: {{...}}}}, found {config!r}"
        )
    unknown = sorted(set(config) - {"name", "params"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid: name, params")
    params = config.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params: expected a mapping, found {params!r}")
    return str(config["name"]), dict(params)


def build_sub_encoder(config: Any, entry: Mapping[str, Any], *, where: str) -> nn.Module:
    """An encoder from ``{name, params}`` (or a bare name) for one block: encoders that declare
    ``accepts_block_spec`` get the block's entry (shape plus preprocessor facts), the others
    the per-sample shape as a tuple. Parameter problems raise one ``ConfigError`` naming
    ``where``."""
    name, params = _entry(config, where)
    if name not in ENCODERS:
        raise ConfigError(f"{where}: {unknown_name('encoder', name, ENCODERS.names())}")
    problems = ENCODERS.check_params(name, params)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    builder = ENCODERS.get(name)
    shape: Any = (
        dict(entry) if getattr(builder, "accepts_block_spec", False) else tuple(entry["shape"])
    )
    encoder = builder(shape, **params)
    if not isinstance(getattr(encoder, "out_features", None), int):
        raise ConfigError(f"{where}: encoder {name!r} has no integer out_features")
    return encoder  # type: ignore[no-any-return]


def presence(x: Mapping[str, Tensor], block: str) -> Tensor:
    """bool ``[B]``: which samples carry ``block`` (``<block>_present`` when given, else the
    block is not all zeros)."""
    flag = x.get(block + PRESENT_SUFFIX)
    if flag is not None:
        return flag.reshape(flag.shape[0]) > 0.5
    return x[block].reshape(x[block].shape[0], -1).ne(0).any(dim=1)


def masked_mean_tokens(h: Tensor, keep: Tensor) -> Tensor:
    """Mean of tokens ``h [B, T, D]`` where ``keep [B, T]`` (at least one per row)."""
    weights = keep.to(h.dtype).unsqueeze(-1)
    return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _width(encoder: nn.Module) -> int:
    return int(cast(Any, encoder).out_features)


def _where_rows(keep: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(keep.reshape(-1, *([1] * (a.dim() - 1))), a, b)


def _check_fusion(
    input_shape: Any, encoders: Mapping[str, Any], *, mode: str, d_model: int, heads: int
) -> None:
    """``ConfigError`` unless every input block of ``input_shape`` has an encoder in
    ``encoders`` (or is the presence mask of one) and ``mode`` can fuse them."""
    if not isinstance(input_shape, Mapping) or _is_block_entry(input_shape):
        raise ConfigError(
            "fusion encoder needs named input blocks (a dict input, one block per modality); "
            f"found input shape {input_shape!r}"
        )
    if mode not in FUSION_MODES:
        raise ConfigError(f"fusion: mode must be one of {', '.join(FUSION_MODES)}, found {mode!r}")
    if not isinstance(encoders, Mapping) or not encoders:
        raise ConfigError("fusion: `encoders` must map at least one input block to an encoder")
    unknown = [b for b in encoders if b not in input_shape]
    if unknown:
        raise ConfigError(
            f"fusion.encoders: no input block(s) {unknown}; blocks: {', '.join(input_shape)}"
        )
    unused = [
        b
        for b in input_shape
        if b not in encoders
        and not (b.endswith(PRESENT_SUFFIX) and b[: -len(PRESENT_SUFFIX)] in encoders)
    ]
    if unused:
        raise ConfigError(
            f"fusion.encoders: input block(s) {unused} have no encoder (blocks named "
            f"<block>{PRESENT_SUFFIX} are presence masks)"
        )
    if mode == "cross_attention" and d_model % heads:
        raise ConfigError(f"fusion: d_model {d_model} is not divisible by heads {heads}")


@ENCODERS.register("fusion", "multimodal: per-block encoders fused by concat, gates or attention")
class FusionEncoder(nn.Module):
    """Per-modality encoders over named input blocks, fused into one feature vector.

    ``encoders`` maps each block to ``{name, params}`` (any registered encoder; the modality
    encoders read their block's spec). Each block's features are projected to ``d_model`` and
    layer-normalised, then fused by ``mode``:

    * ``concat``: the projected features side by side (``len(encoders) · d_model``); a missing
      block contributes a learned "missing" vector of its own.
    * ``gated``: a gated multimodal unit (Arevalo, Solorio, Montes-y-Gómez & González, ICLR
      workshop 2017), generalised to n modalities: ``h_b = tanh(p_b)``, per-feature gates
      ``z = softmax_b(W [p_1; …; p_n])`` (a softmax over the present blocks, for each of the
      ``d_model`` features), output ``Σ_b z_b ⊙ h_b`` (``d_model``; zeros when every block is
      missing).
    * ``cross_attention``: a learned fusion token and one token per block (plus a learned
      modality embedding) pass through ``layers`` Transformer encoder layers (Vaswani et al.,
      NeurIPS 2017) in which every token attends across modalities and missing blocks are masked
      out as keys; the output is the mean of the fusion token and the present blocks' tokens,
      layer-normalised (``d_model``; reading the fusion token alone let the faster-learning
      modality crowd out the other in our multimodal recipe).

    ``out_features``, when set, adds a linear layer and ReLU. See the module docstring for the
    missing-modality convention (``<block>_present``).

    Example:
        >>> spec = {"a": {"shape": [4]}, "b": {"shape": [3]}, "b_present": {"shape": []}}
        >>> enc = FusionEncoder(spec, encoders={"a": {"name": "mlp", "params": {"hidden": [8]}},
        ...                                     "b": {"name": "mlp", "params": {"hidden": [8]}}},
        ...                     mode="gated", d_model=6)
        >>> x = {"a": torch.randn(5, 4), "b": torch.randn(5, 3), "b_present": torch.zeros(5)}
        >>> enc(x).shape
        torch.Size([5, 6])
    """

    def __init__(
        self,
        input_shape: Any,
        *,
        encoders: Mapping[str, Any],
        mode: str = "concat",
        d_model: int = 64,
        heads: int = 4,
        layers: int = 1,
        dropout: float = 0.0,
        out_features: int | None = None,
    ) -> None:
        super().__init__()
        _check_fusion(input_shape, encoders, mode=mode, d_model=d_model, heads=heads)
        self.blocks = list(encoders)
        self.mode = mode
        self.encoders = nn.ModuleDict(
            {
                b: build_sub_encoder(cfg, input_shape[b], where=f"fusion.encoders.{b}")
                for b, cfg in encoders.items()
            }
        )
        self.project = nn.ModuleDict(
            {
                b: nn.Sequential(nn.Linear(_width(enc), d_model), nn.LayerNorm(d_model))
                for b, enc in self.encoders.items()
            }
        )
        self._embed_widths = [
            int(cast(Any, enc).embed_features)
            if hasattr(enc, "embed_features")
            else math.prod(int(d) for d in input_shape[b]["shape"])
            for b, enc in self.encoders.items()
        ]
        n = len(self.blocks)
        width = d_model
        if mode == "concat":
            self.missing = nn.Parameter(torch.zeros(n, d_model))
            width = n * d_model
        elif mode == "gated":
            self.gate = nn.Linear(n * d_model, n * d_model)
        else:
            self.fusion_token = nn.Parameter(torch.zeros(1, 1, d_model))
            self.modality = nn.Parameter(torch.randn(n, d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(
                d_model,
                heads,
                dim_feedforward=2 * d_model,
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.attention = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.head: nn.Module = nn.Identity()
        if out_features is not None:
            self.head = nn.Sequential(nn.Linear(width, out_features), nn.ReLU())
            width = out_features
        self.out_features = int(width)

    @property
    def in_features(self) -> int:
        """Width of ``embed(x)``, what mixture-of-experts gates read."""
        return sum(self._embed_widths)

    def embed(self, x: Mapping[str, Tensor]) -> Tensor:
        """A cheap summary for gates: per block, its encoder's ``embed`` where it has one (e.g.
        the mean token embedding of a text), else the flattened block; missing blocks are
        zeros."""
        present = self.presence(x)
        parts = []
        for i, b in enumerate(self.blocks):
            encoder = self.encoders[b]
            block = _where_rows(present[:, i], x[b], torch.zeros_like(x[b]))
            if hasattr(encoder, "embed_features"):
                part = cast(Any, encoder).embed(block)
            else:
                part = block.flatten(1).to(torch.get_default_dtype())
            parts.append(_where_rows(present[:, i], part, torch.zeros_like(part)))
        return torch.cat(parts, dim=1)

    def presence(self, x: Mapping[str, Tensor]) -> Tensor:
        """bool ``[B, blocks]``: which samples carry which block."""
        return torch.stack([presence(x, b) for b in self.blocks], dim=1)

    def forward(self, x: Mapping[str, Tensor]) -> Tensor:
        if not isinstance(x, Mapping):
            raise ConfigError("fusion encoder: needs a dict input (one tensor per block)")
        present = self.presence(x)  # [B, n]
        features = []
        for i, b in enumerate(self.blocks):
            block = x[b]
            clean = _where_rows(present[:, i], block, torch.zeros_like(block))
            features.append(self.project[b](self.encoders[b](clean)))
        h = torch.stack(features, dim=1)  # [B, n, d]
        keep = present[:, :, None]
        if self.mode == "concat":
            h = torch.where(keep, h, self.missing.to(h.dtype).expand_as(h))
            out = h.flatten(1)
        elif self.mode == "gated":
            h = torch.where(keep, h, torch.zeros_like(h))
            logits = self.gate(h.flatten(1)).view_as(h)  # [B, n, d]: a gate per feature
            logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
            z = torch.softmax(logits, dim=1) * keep.to(logits.dtype)  # all missing: zeros
            out = (z * torch.tanh(h)).sum(dim=1)
        else:
            tokens = torch.where(keep, h, torch.zeros_like(h)) + self.modality.to(h.dtype)
            fuse = self.fusion_token.to(h.dtype).expand(h.shape[0], 1, -1)
            sequence = torch.cat([fuse, tokens], dim=1)
            always = torch.zeros_like(present[:, :1])
            mask = torch.cat([always, ~present], dim=1)  # True = ignored as a key
            attended = self.attention(sequence, src_key_padding_mask=mask)
            out = self.norm(masked_mean_tokens(attended, ~mask))
        return self.head(self.dropout(out))


@ENCODERS.register("augmented", "train-time image augmentation in front of an image encoder")
class AugmentedEncoder(nn.Module):
    """``encoder`` (``{name, params}``, e.g. ``cnn`` or ``resnet``) applied to images augmented
    by ``polytask.models.augment.ImageAugment(**augment)`` — random crop with padding, horizontal
    flip, small affine — in training mode only; evaluation and prediction see the images as
    they are. Images are ``[C, H, W]`` (or ``[H, W]``, one channel). In a dict input, ``block``
    names the image block (inside ``fusion`` the block is given).

    Example:
        >>> enc = AugmentedEncoder((1, 8, 8), encoder={"name": "cnn", "params": {"channels": [4]}},
        ...                        augment={"crop_padding": 1, "flip": 0.5})
        >>> enc(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3, 128])
    """

    accepts_block_spec = True

    def __init__(
        self,
        input_shape: Any,
        *,
        encoder: Mapping[str, Any],
        augment: Mapping[str, Any] | None = None,
        block: str | None = None,
    ) -> None:
        super().__init__()
        self.block, entry = resolve_block("augmented", input_shape, block)
        shape = [int(s) for s in entry["shape"]]
        if len(shape) not in (2, 3):
            raise ConfigError(
                f"augmented encoder needs images [channels, height, width] or [height, width], "
                f"found input shape {shape}"
            )
        self._shape = shape
        options = dict(augment or {})
        try:
            self.augment = ImageAugment(**options)
        except TypeError:
            valid = "crop_padding, flip, rotate, scale, translate"
            raise ConfigError(
                f"augmented.augment: unknown option(s) in {sorted(options)}; valid: {valid}"
            ) from None
        self.encoder = build_sub_encoder(encoder, entry, where="augmented.encoder")
        self.out_features = _width(self.encoder)

    @property
    def in_features(self) -> int:
        """Width of the flattened images (what mixture-of-experts gates read)."""
        return math.prod(self._shape)

    def embed(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The flattened, unaugmented images (what gates read for a dict input)."""
        return pick(x, self.block, "augmented").flatten(1).to(torch.get_default_dtype())

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        images = pick(x, self.block, "augmented")
        if self.training:
            b = images.shape[0]
            if len(self._shape) == 2:
                batch = images.reshape(b, 1, *self._shape)
            else:
                batch = images.reshape(b, *self._shape)
            images = self.augment(batch).reshape(images.shape)
        return self.encoder(images)  # type: ignore[no-any-return]
