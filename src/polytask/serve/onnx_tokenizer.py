"""A tokenizer that reads a Hugging Face ``tokenizer.json`` and encodes texts with the standard
library alone, for the torch-free runtime (``polytask.serve.onnx_runtime``).

It implements what polytask's tokenizers use: the normalizers ``NFD``/``NFC``/``NFKD``/``NFKC``,
``StripAccents``, ``Lowercase`` and ``BertNormalizer``; the pre-tokenizers ``BertPreTokenizer``,
``Whitespace`` and ``WhitespaceSplit``; the ``WordPiece`` (greedy longest match, BERT) and ``BPE``
(merges by rank, Sennrich et al. 2016) models; the ``TemplateProcessing``/``BertProcessing``
post-processors for one sequence; truncation and padding to a fixed length. Anything else is an
``ExportError`` at export time (``check_supported``), naming the component, so a model is never
exported with a tokenizer the runtime would apply differently.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Any

from polytask.errors import ExportError

_NORMALIZERS = {"NFD", "NFC", "NFKD", "NFKC", "StripAccents", "Lowercase", "BertNormalizer"}
_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit"}
_MODELS = {"WordPiece", "BPE"}
_POST = {"TemplateProcessing", "BertProcessing"}


def _components(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A normalizer or pre-tokenizer node, its ``Sequence`` flattened."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        key = "normalizers" if "normalizers" in node else "pretokenizers"
        return [c for child in node[key] for c in _components(child)]
    return [node]


def check_supported(spec: dict[str, Any]) -> None:
    """``ExportError`` naming the first component of the tokenizer JSON ``spec`` that
    ``SubwordTokenizer`` does not implement."""
    parts = [("normalizer", c, _NORMALIZERS) for c in _components(spec.get("normalizer"))] + [
        ("pre-tokenizer", c, _PRE_TOKENIZERS) for c in _components(spec.get("pre_tokenizer"))
    ]
    parts.append(("model", spec.get("model") or {}, _MODELS))
    if spec.get("post_processor") is not None:
        parts.append(("post-processor", spec["post_processor"], _POST))
    for what, node, known in parts:
        if node.get("type") not in known:
            raise ExportError(
                f"tokenizer: the {what} {node.get('type')!r} cannot be applied by the torch-free "
                f"runtime (supported: {', '.join(sorted(known))})"
            )
    model = spec["model"]
    if model["type"] == "BPE" and (model.get("dropout") or model.get("byte_fallback")):
        raise ExportError("tokenizer: BPE with dropout or byte fallback is not supported")


def _strip_accents(text: str) -> str:
    return "".join(c for c in text if unicodedata.category(c) != "Mn")


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_chinese(code: int) -> bool:
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0x20000 <= code <= 0x2A6DF
        or 0x2A700 <= code <= 0x2B73F
        or 0x2B740 <= code <= 0x2B81F
        or 0x2B820 <= code <= 0x2CEAF
        or 0xF900 <= code <= 0xFAFF
        or 0x2F800 <= code <= 0x2FA1F
    )


def _bert_normalize(node: dict[str, Any], text: str) -> str:
    if node.get("clean_text", True):
        text = "".join(
            " " if c.isspace() else c
            for c in text
            if not (
                ord(c) in (0, 0xFFFD)
                or (unicodedata.category(c).startswith("C") and c not in "\t\n\r")
            )
        )
    if node.get("handle_chinese_chars", True):
        text = "".join(f" {c} " if _is_chinese(ord(c)) else c for c in text)
    lowercase = node.get("lowercase", True)
    strip = node.get("strip_accents")
    if strip or (strip is None and lowercase):
        text = _strip_accents(unicodedata.normalize("NFD", text))
    return text.lower() if lowercase else text


def _normalizer(node: dict[str, Any]) -> Callable[[str], str]:
    kind = node["type"]
    if kind in ("NFD", "NFC", "NFKD", "NFKC"):
        return lambda text: unicodedata.normalize(kind, text)
    if kind == "StripAccents":
        return _strip_accents
    if kind == "Lowercase":
        return str.lower
    return lambda text: _bert_normalize(node, text)


def _split_bert(text: str) -> list[str]:
    """Split on whitespace (dropped) and around every punctuation character (kept alone)."""
    words: list[str] = []
    current: list[str] = []
    for char in text:
        if char.isspace() or _is_punctuation(char):
            if current:
                words.append("".join(current))
                current = []
            if not char.isspace():
                words.append(char)
        else:
            current.append(char)
    if current:
        words.append("".join(current))
    return words


_WHITESPACE_PATTERN = re.compile(r"\w+|[^\w\s]+")


def _pre_tokenize(node: dict[str, Any], words: list[str]) -> list[str]:
    kind = node["type"]
    out: list[str] = []
    for word in words:
        if kind == "BertPreTokenizer":
            out += _split_bert(word)
        elif kind == "Whitespace":
            out += _WHITESPACE_PATTERN.findall(word)
        else:
            out += word.split()
    return out


class SubwordTokenizer:
    """Encode texts as a Hugging Face ``tokenizers.Tokenizer`` with the JSON ``spec`` would,
    truncated and right-padded (id ``pad_id``) to ``max_length`` ids.

    Example:
        >>> spec = {"normalizer": {"type": "Lowercase"},
        ...         "pre_tokenizer": {"type": "WhitespaceSplit"},
        ...         "model": {"type": "WordPiece", "unk_token": "[UNK]",
        ...                   "continuing_subword_prefix": "##",
        ...                   "vocab": {"[PAD]": 0, "[UNK]": 1, "play": 2, "##ing": 3}}}
        >>> SubwordTokenizer(spec, max_length=5).encode("Playing zzz")
        [2, 3, 1, 0, 0]
    """

    def __init__(self, spec: dict[str, Any], *, max_length: int, pad_id: int = 0) -> None:
        check_supported(spec)
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        self._normalizers = [_normalizer(n) for n in _components(spec.get("normalizer"))]
        self._pre = _components(spec.get("pre_tokenizer"))
        model = spec["model"]
        self._kind = model["type"]
        self._vocab: dict[str, int] = dict(model["vocab"])
        self._unk = model.get("unk_token")
        self._prefix = model.get("continuing_subword_prefix") or ""
        self._suffix = model.get("end_of_word_suffix") or ""
        self._max_word = int(model.get("max_input_chars_per_word", 100))
        self._fuse_unk = bool(model.get("fuse_unk", False))
        self._ranks = self._merge_ranks(model.get("merges") or [])
        self._cache: dict[str, list[int]] = {}
        self._added = sorted(
            ((t["content"], int(t["id"])) for t in spec.get("added_tokens") or []),
            key=lambda item: -len(item[0]),
        )
        self._added_pattern = (
            re.compile("|".join(re.escape(content) for content, _ in self._added))
            if self._added
            else None
        )
        self._template = self._single_template(spec.get("post_processor"))

    @staticmethod
    def _merge_ranks(merges: list[Any]) -> dict[tuple[str, str], int]:
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        return {(a, b): rank for rank, (a, b) in enumerate(pairs)}

    @staticmethod
    def _single_template(node: dict[str, Any] | None) -> tuple[list[int], list[int]]:
        """Ids added (before, after) one sequence by the post-processor."""
        if node is None:
            return [], []
        if node["type"] == "BertProcessing":
            return [int(node["cls"][1])], [int(node["sep"][1])]
        before: list[int] = []
        after: list[int] = []
        seen_sequence = False
        for piece in node["single"]:
            if "Sequence" in piece:
                seen_sequence = True
                continue
            token = piece["SpecialToken"]["id"]
            ids = node["special_tokens"][token]["ids"]
            (after if seen_sequence else before).extend(int(i) for i in ids)
        return before, after

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """``max_length`` token ids of ``text``."""
        ids: list[int] = []
        for piece, added_id in self._split_added(text):
            if added_id is not None:
                ids.append(added_id)
                continue
            for normalize in self._normalizers:
                piece = normalize(piece)
            words = [piece]
            for node in self._pre:
                words = _pre_tokenize(node, words)
            for word in words:
                ids += self._word_ids(word)
        before, after = self._template
        room = max(self.max_length - len(before) - len(after), 0)
        ids = (before + ids[:room] + after)[: self.max_length]
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def _split_added(self, text: str) -> list[tuple[str, int | None]]:
        if self._added_pattern is None:
            return [(text, None)]
        ids = dict(self._added)
        out: list[tuple[str, int | None]] = []
        start = 0
        for match in self._added_pattern.finditer(text):
            if match.start() > start:
                out.append((text[start : match.start()], None))
            out.append((match.group(), ids[match.group()]))
            start = match.end()
        if start < len(text):
            out.append((text[start:], None))
        return out

    def _word_ids(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is None:
            cached = self._wordpiece(word) if self._kind == "WordPiece" else self._bpe(word)
            if len(self._cache) < 100_000:
                self._cache[word] = cached
        return cached

    def _unk_id(self) -> list[int]:
        if self._unk is None or self._unk not in self._vocab:
            return []
        return [self._vocab[self._unk]]

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > self._max_word:
            return self._unk_id()
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end]
                if start > 0:
                    piece = self._prefix + piece
                if piece in self._vocab:
                    found = self._vocab[piece]
                    break
                end -= 1
            if found is None:
                return self._unk_id()
            ids.append(found)
            start = end
        return ids

    def _bpe(self, word: str) -> list[int]:
        symbols: list[str | None] = []
        for i, char in enumerate(word):
            symbol = (self._prefix if i > 0 else "") + char
            if i == len(word) - 1:
                symbol += self._suffix
            if symbol in self._vocab:
                symbols.append(symbol)
            elif self._fuse_unk and symbols and symbols[-1] is None:
                continue
            else:
                symbols.append(None)  # unknown character
        while True:
            best = None
            for i in range(len(symbols) - 1):
                a, b = symbols[i], symbols[i + 1]
                if a is None or b is None:
                    continue
                rank = self._ranks.get((a, b))
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, i)
            if best is None:
                break
            i = best[1]
            a, b = symbols[i], symbols[i + 1]
            assert a is not None and b is not None
            merged = (
                a + b[len(self._prefix) :] if self._prefix and b.startswith(self._prefix) else a + b
            )
            symbols[i : i + 2] = [merged]
        ids: list[int] = []
        for symbol in symbols:
            ids += self._unk_id() if symbol is None else [self._vocab[symbol]]
        return ids


__all__ = ["SubwordTokenizer", "check_supported"]
