"""``hf``: any local Hugging Face text model as a shared encoder (``pip install 'polytask[hf]'``).

The model folder (``config.json`` and the weights, as ``save_pretrained`` writes them) is read
with ``transformers.AutoModel`` from disk only; its tokenizer is the dataset's
``tokenizer: {pretrained: FOLDER}`` (``polytask.data.text``: the folder's ``tokenizer.json``, or
what ``AutoTokenizer`` makes of its vocabulary files). Next to the built-in ``minilm`` encoder,
which needs no ``transformers``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.encoders import ENCODERS
from polytask.models.fusion import pick, resolve_block
from polytask.models.text import masked_mean
from polytask.models.transfer import Backbone

__all__ = ["HFBackbone", "HFTextEncoder"]

HF_EXTRA = "polytask[hf]"


class HFBackbone(Backbone):
    """A ``transformers.AutoModel`` read from a local folder, as a freezable backbone."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        try:
            from transformers import AutoModel
        except ImportError:
            raise ConfigError(
                f"the hf encoder needs transformers: pip install '{HF_EXTRA}'"
            ) from None
        if not (Path(folder) / "config.json").is_file():
            raise ConfigError(
                f"hf encoder: {folder} is not a Hugging Face model folder (no config.json)"
            )
        try:
            self.model = AutoModel.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError...
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ConfigError(f"hf encoder: cannot load the model in {folder}: {reason}") from None
        self.hidden_size = int(self.model.config.hidden_size)

    def forward(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The last hidden states ``[B, L, hidden]``."""
        out = self.model(input_ids=ids, attention_mask=attention_mask)
        return out.last_hidden_state  # type: ignore[no-any-return]


@ENCODERS.register("hf", "text: a local Hugging Face model folder (AutoModel; polytask[hf])")
class HFTextEncoder(nn.Module):
    """A Hugging Face text model (any ``AutoModel`` folder: BERT, RoBERTa, DistilBERT…) over a
    text block, pooled to one vector per text: the mean over the non-padding tokens (``mean``)
    or the first token (``cls``), then an optional ``projection`` (a linear layer and GELU).

    The text block must be tokenized by the model's own vocabulary: the dataset's ``tokenizer:
    {pretrained: FOLDER}`` with the same folder. ``model.transfer`` freezes the model (the
    projection always trains): ``freeze: all`` for frozen features, ``until:model.encoder.layer.4``
    to tune the top layers.
    """

    accepts_block_spec = True

    def __init__(
        self,
        input_shape: Any,
        *,
        model: str,
        block: str | None = None,
        pooling: Literal["mean", "cls"] = "mean",
        projection: int | None = 128,
    ) -> None:
        super().__init__()
        self.block, entry = resolve_block("hf", input_shape, block, needs=["vocab_size"])
        used = entry.get("pretrained")
        if used is None or Path(str(used)).resolve() != Path(model).resolve():
            raise ConfigError(
                "hf encoder: the text block must be tokenized by the model's own vocabulary: "
                f"set the dataset's tokenizer to {{pretrained: {model}}} (found {used!r})"
            )
        self.backbone = HFBackbone(model)
        vocab = int(entry["vocab_size"])
        embeddings = self.backbone.model.get_input_embeddings().num_embeddings
        if vocab > embeddings:
            raise ConfigError(
                f"hf encoder: the tokenizer has {vocab} tokens, the model {embeddings}"
            )
        self.pad_id, self.pooling = int(entry.get("pad_id", 0)), pooling
        self.projection: nn.Module = nn.Identity()
        width = self.backbone.hidden_size
        if projection is not None:
            self.projection = nn.Sequential(nn.Linear(width, projection), nn.GELU())
            width = projection
        self.out_features = int(width)

    @property
    def in_features(self) -> int:
        """Width of what mixture-of-experts gates read (``embed(x)``)."""
        return self.backbone.hidden_size

    def embed(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """The pooled text embedding ``[B, hidden]`` (before the projection)."""
        ids = pick(x, self.block, "hf").long()
        keep = ids != self.pad_id
        h = self.backbone(ids, keep.long())
        return h[:, 0] if self.pooling == "cls" else masked_mean(h, keep)

    def forward(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        return self.projection(self.embed(x))  # type: ignore[no-any-return]
