"""Text inputs: a subword tokenizer trained on the training texts and saved with the run.

``TextTokenizer`` is the preprocessor of a text block (a list of strings): ``fit`` trains a
WordPiece or BPE vocabulary with the ``tokenizers`` library on the training texts only (or loads
a pretrained tokenizer, e.g. the one of all-MiniLM-L6-v2), ``transform`` turns texts into token
ids ``[N, max_length]`` (truncated, right-padded with id 0), and the whole tokenizer round-trips
through JSON (``tokenizers``' own ``to_str``) in the run folder. ``spec()`` tells the text
encoders the vocabulary size and the padding id.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from polytask.data.preprocess import PREPROCESSORS
from polytask.errors import ConfigError, DataError
from polytask.pretrained import pretrained_dir

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID = 0
MODELS = ("wordpiece", "bpe")


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:  # a core dependency; only a broken install lacks it
        raise ConfigError(f"text inputs need the 'tokenizers' package: {exc}") from exc
    return tokenizers


def _hf_tokenizer(folder: Path) -> Any:
    """The fast (``tokenizers``) tokenizer of a Hugging Face model folder without a
    ``tokenizer.json``, converted by ``transformers.AutoTokenizer`` (``polytask[hf]``)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(
            f"{folder}: reading its tokenizer needs transformers: pip install 'polytask[hf]'"
        ) from None
    try:
        loaded = AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError...
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise DataError(f"{folder}: cannot read its tokenizer: {reason}") from None
    return loaded.backend_tokenizer


def as_texts(values: Any, *, source: str = "text") -> list[str]:
    """``values`` as a list of strings; ``None``/NaN (a missing text) becomes ``""``; anything
    else that is not a string raises ``DataError`` naming the row."""
    texts: list[str] = []
    for row, value in enumerate(list(values)):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            texts.append("")
        elif isinstance(value, str | np.str_):
            texts.append(str(value))
        else:
            raise DataError(
                f"{source}: row {row}: expected a text, found {type(value).__name__} {value!r}"
            )
    return texts


def train_subwords(
    word_counts: Mapping[str, int],
    *,
    vocab_size: int,
    min_frequency: int = 1,
    specials: Sequence[str] = (PAD, UNK),
    prefix: str = "",
) -> tuple[list[str], list[tuple[str, str]]]:
    """A byte-pair-encoding vocabulary (Sennrich, Haddow & Birch, ACL 2016) learned from word
    counts: start from the characters, then repeatedly merge the most frequent adjacent pair
    of symbols (ties broken by the pair's text, so training is deterministic) while the pair
    occurs at least ``min_frequency`` times and the vocabulary is below ``vocab_size``.
    ``prefix`` marks word-internal symbols (``"##"`` gives a WordPiece vocabulary, as BERT's
    trainer builds it). Returns ``(vocabulary with the specials first, merges)``.

    (The ``tokenizers`` trainers break ties in hash-map order, so the same texts can give
    different vocabularies from run to run; polytask runs must be reproducible.)

    Example:
        >>> vocab, merges = train_subwords({"low": 5, "lower": 2, "newest": 6}, vocab_size=16)
        >>> merges[:3]  # w-e occurs 2 + 6 times; then l-o and o-w tie at 7: l-o wins
        [('w', 'e'), ('l', 'o'), ('e', 'we')]
    """
    words = sorted(w for w in word_counts if w)
    seqs = [[w[0]] + [prefix + c for c in w[1:]] for w in words]
    freq = [int(word_counts[w]) for w in words]
    vocab = list(dict.fromkeys([*specials, *sorted({s for seq in seqs for s in seq})]))
    known = set(vocab)
    pairs: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in pairwise(seq):
            pairs[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, a, b) for (a, b), c in pairs.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(vocab) < vocab_size:
        negative, a, b = heapq.heappop(heap)
        if pairs.get((a, b), 0) != -negative or -negative <= 0:
            continue  # a stale entry: the count changed since it was pushed
        if -negative < min_frequency:
            break
        merged = a + b[len(prefix) :] if prefix and b.startswith(prefix) else a + b
        merges.append((a, b))
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop((a, b), ())):
            seq = seqs[i]
            for pair in pairwise(seq):
                pairs[pair] -= freq[i]
                changed.add(pair)
            out: list[str] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
            for pair in pairwise(out):
                pairs[pair] += freq[i]
                where[pair].add(i)
                changed.add(pair)
        for pair in sorted(changed):
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], *pair))
            else:
                del pairs[pair]
    return vocab, merges


@PREPROCESSORS.register("tokenizer", "subword tokenizer (WordPiece/BPE) trained on train texts")
class TextTokenizer:
    """Texts → token ids ``[N, max_length]`` (int64, right-padded with id 0 = ``[PAD]``, id 1 =
    ``[UNK]``) with a subword vocabulary trained on the training texts.

    ``model`` is ``wordpiece`` (Schuster & Nakajima, ICASSP 2012; as in BERT) or ``bpe``
    (byte-pair encoding, Sennrich, Haddow & Birch, ACL 2016); texts are Unicode-normalised
    (NFD, accents stripped, lower-cased when ``lowercase``) and split on whitespace and
    punctuation before subword segmentation. ``pretrained`` (a name such as
    ``all-minilm-l6-v2``, or a folder with ``tokenizer.json``) loads a fixed tokenizer instead of
    training one: the tokenizer a pretrained encoder needs.

    Example:
        >>> tok = TextTokenizer(vocab_size=60, max_length=6)
        >>> tok.fit(["the cat sat", "the dog sat", "a cat ran"])
        >>> ids = tok.transform(["the cat ran", "zebra"])
        >>> ids.shape, ids.dtype, int(ids[1, -1])
        (torch.Size([2, 6]), torch.int64, 0)
        >>> again = TextTokenizer.from_dict(tok.to_dict())
        >>> again.transform(["the cat ran"]).tolist() == ids[:1].tolist()
        True
    """

    kind: ClassVar[str] = "tokenizer"

    def __init__(
        self,
        *,
        model: str = "wordpiece",
        vocab_size: int = 2000,
        max_length: int = 32,
        min_frequency: int = 1,
        lowercase: bool = True,
        pretrained: str | None = None,
        tokenizer_json: str | None = None,
    ) -> None:
        if model not in MODELS:
            raise ConfigError(
                f"tokenizer: model must be one of {', '.join(MODELS)}, found {model!r}"
            )
        if max_length < 1 or vocab_size < 3 or min_frequency < 1:
            raise ConfigError(
                f"tokenizer: need max_length >= 1, vocab_size >= 3 and min_frequency >= 1, found "
                f"{max_length}, {vocab_size}, {min_frequency}"
            )
        self.model = model
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length)
        self.min_frequency = int(min_frequency)
        self.lowercase = bool(lowercase)
        self.pretrained = pretrained
        self._tokenizer: Any = None
        if tokenizer_json is not None:
            self._tokenizer = _tokenizers().Tokenizer.from_str(tokenizer_json)
            self._configure()

    # ------------------------------------------------------------------ fitting
    def fit(self, values: Any) -> None:
        """Train the vocabulary on ``values`` (the training texts), or load the pretrained
        tokenizer."""
        if self.pretrained is not None:
            path = pretrained_dir(self.pretrained) / "tokenizer.json"
            if not path.is_file() and (path.parent / "config.json").is_file():
                self._tokenizer = _hf_tokenizer(path.parent)  # a Hugging Face model folder
                self._configure()
                return
            if not path.is_file():
                raise DataError(f"{path}: no such tokenizer file")
            try:
                self._tokenizer = _tokenizers().Tokenizer.from_file(str(path))
            except Exception as exc:  # the Rust library raises plain Exceptions
                raise DataError(f"{path}: cannot read the tokenizer: {exc}") from exc
            self._configure()
            return
        tk = _tokenizers()
        norm = [tk.normalizers.NFD(), tk.normalizers.StripAccents()]
        if self.lowercase:
            norm.append(tk.normalizers.Lowercase())
        normalizer = tk.normalizers.Sequence(norm)
        pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
        counts: Counter[str] = Counter()
        for text in as_texts(values, source="tokenizer"):
            words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
            counts.update(word for word, _ in words)
        prefix = "##" if self.model == "wordpiece" else ""
        vocab, merges = train_subwords(
            counts,
            vocab_size=self.vocab_size,
            min_frequency=self.min_frequency,
            specials=[PAD, UNK],
            prefix=prefix,
        )
        ids = {token: i for i, token in enumerate(vocab)}
        if self.model == "wordpiece":
            tokenizer = tk.Tokenizer(tk.models.WordPiece(vocab=ids, unk_token=UNK))
            tokenizer.decoder = tk.decoders.WordPiece()
        else:
            tokenizer = tk.Tokenizer(tk.models.BPE(vocab=ids, merges=merges, unk_token=UNK))
        tokenizer.normalizer = normalizer
        tokenizer.pre_tokenizer = pre_tokenizer
        self._tokenizer = tokenizer
        self._configure()

    def _configure(self) -> None:
        tok = self._tokenizer
        if tok.token_to_id(PAD) != PAD_ID:
            raise DataError(f"tokenizer: {PAD!r} must have id {PAD_ID}")
        tok.enable_truncation(max_length=self.max_length)
        tok.enable_padding(pad_id=PAD_ID, pad_token=PAD, length=self.max_length)

    @property
    def tokenizer(self) -> Any:
        """The fitted ``tokenizers.Tokenizer``."""
        if self._tokenizer is None:
            raise DataError("tokenizer: transform before fit")
        return self._tokenizer

    # ------------------------------------------------------------------ use
    def transform(self, values: Any) -> Tensor:
        """Token ids ``[N, max_length]`` (int64); a missing text is all padding."""
        encodings = self.tokenizer.encode_batch(as_texts(values, source="tokenizer"))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(-1, self.max_length)
        return torch.from_numpy(ids)

    def tokens(self, text: str) -> list[str]:
        """The subword tokens of ``text`` without padding (for inspection)."""
        return [t for t in self.tokenizer.encode(text).tokens if t != PAD]

    def spec(self) -> dict[str, Any]:
        """What a text encoder needs: ``vocab_size``, ``pad_id`` and ``pretrained``."""
        return {
            "vocab_size": int(self.tokenizer.get_vocab_size()),
            "pad_id": PAD_ID,
            "pretrained": self.pretrained,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "min_frequency": self.min_frequency,
            "lowercase": self.lowercase,
            "pretrained": self.pretrained,
            "tokenizer": json.loads(self.tokenizer.to_str()),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextTokenizer:
        return cls(
            model=d["model"],
            vocab_size=d["vocab_size"],
            max_length=d["max_length"],
            min_frequency=d["min_frequency"],
            lowercase=d["lowercase"],
            pretrained=d.get("pretrained"),
            tokenizer_json=json.dumps(d["tokenizer"]),
        )


def tokenizer_from_params(params: dict[str, Any] | None, *, source: str) -> TextTokenizer:
    """A ``TextTokenizer`` from a dataset's ``tokenizer:`` parameters; ``ConfigError`` names an
    unknown key."""
    params = dict(params or {})
    allowed = {"model", "vocab_size", "max_length", "min_frequency", "lowercase", "pretrained"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ConfigError(
            f"{source}: unknown tokenizer parameter(s) {unknown}; "
            f"valid: {', '.join(sorted(allowed))}"
        )
    return TextTokenizer(**params)
