"""``hf``: a local Hugging Face model folder as a text encoder. The folder is made here: a tiny
BERT with random weights (``BertConfig``) and a WordPiece vocabulary written by hand, saved with
``save_pretrained``; nothing is downloaded."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from polytask.config import parse_config
from polytask.data.text import TextTokenizer
from polytask.errors import ConfigError
from polytask.models.hf_text import HFTextEncoder
from polytask.models.transfer import backbones
from polytask.run.build import build_model_for
from polytask.run.single import train_run
from polytask.tasks import TaskSpec

transformers = pytest.importorskip("transformers", reason="needs polytask[hf]")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the",
    "a",
    "was",
    "is",
    "and",
    "but",
    "not",
    "never",
    "very",
    "so",
    "what",
    "great",
    "awful",
    "good",
    "bad",
    "game",
    "match",
    "team",
    "food",
    "meal",
    "taste",
    "phone",
    "app",
    "laptop",
    "trip",
    "hotel",
    "beach",
    "delicious",
    "buggy",
    "fun",
    "slow",
    "fast",
]


def hf_folder(folder: Path) -> Path:
    """A Hugging Face BERT folder: ``config.json``, ``model.safetensors`` and the slow
    tokenizer's files (``vocab.txt``; no ``tokenizer.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [
        *SPECIALS,
        *WORDS,
        *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"),
        *"abcdefghijklmnopqrstuvwxyz",
    ]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(str(folder))
    (folder / "tokenizer.json").unlink(missing_ok=True)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_folder(tmp_path_factory.mktemp("hf") / "tiny-bert")


def test_the_tokenizer_comes_from_autotokenizer(folder: Path) -> None:
    assert not (folder / "tokenizer.json").exists()
    tok = TextTokenizer(pretrained=str(folder), max_length=8)
    tok.fit([])
    ids = tok.transform(["the game was great", ""])
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = reference("the game was great")["input_ids"]
    assert ids[0, : len(expected)].tolist() == expected  # [CLS] the game was great [SEP]
    assert ids[1].tolist() == [2, 3] + [0] * 6  # an empty text: [CLS] [SEP], then padding
    assert tok.spec()["pretrained"] == str(folder)


def test_the_encoder_pools_the_models_hidden_states(folder: Path) -> None:
    tok = TextTokenizer(pretrained=str(folder), max_length=8)
    tok.fit([])
    spec = {"text": {"shape": [8], **tok.spec()}}
    ids = tok.transform(["the food was delicious", "not fun"])
    encoder = HFTextEncoder(spec, model=str(folder), projection=None).eval()
    reference = transformers.AutoModel.from_pretrained(str(folder)).eval()
    keep = ids != 0
    hidden = reference(input_ids=ids, attention_mask=keep.long()).last_hidden_state
    mean = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    with torch.no_grad():
        assert torch.allclose(encoder({"text": ids}), mean, atol=1e-5)
    assert encoder.out_features == 16


def test_the_tokenizer_must_be_the_models_own(folder: Path) -> None:
    spec = {"text": {"shape": [8], "vocab_size": 40, "pad_id": 0, "pretrained": None}}
    with pytest.raises(ConfigError, match="tokenized by the model's own vocabulary"):
        HFTextEncoder(spec, model=str(folder))
    spec["text"]["pretrained"] = str(folder.parent)  # another folder's tokenizer
    with pytest.raises(ConfigError, match="tokenized by the model's own vocabulary"):
        HFTextEncoder(spec, model=str(folder))
    spec["text"]["pretrained"] = str(folder.parent)
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        HFTextEncoder(spec, model=str(folder.parent))


def _text_raw(tiny_raw: dict[str, Any], folder: Path, **transfer: Any) -> dict[str, Any]:
    raw = copy.deepcopy(tiny_raw)
    raw["data"] = {
        "dataset": "text-topics",
        "params": {"num_samples": 96, "tokenizer": {"pretrained": str(folder), "max_length": 12}},
        "batch_size": 32,
    }
    raw["model"] = {"encoder": "hf", "encoder_params": {"model": str(folder), "projection": 8}}
    if transfer:
        raw["model"]["transfer"] = transfer
    raw["balancing"] = {"method": "equal"}
    raw["train"] = {**raw["train"], "epochs": 1}
    return raw


def test_a_run_trains_the_hf_encoder(tiny_raw: dict[str, Any], folder: Path) -> None:
    config = parse_config(_text_raw(tiny_raw, folder))
    result = train_run(config)
    assert set(result.test) == {"topic", "sentiment"}
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.test.values())


def test_freezing_keeps_the_projection_trainable(tiny_raw: dict[str, Any], folder: Path) -> None:
    raw = _text_raw(tiny_raw, folder, freeze="until:model.encoder.layer.1")
    tasks = [TaskSpec("topic", "multiclass", num_classes=4), TaskSpec("sentiment", "binary")]
    spec = {"text": {"shape": [12], "vocab_size": 62, "pad_id": 0, "pretrained": str(folder)}}
    model = build_model_for(parse_config(raw), tasks, spec)
    (backbone,) = backbones(model)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".projection." in n for n in trains)
    assert any("encoder.layer.1." in n for n in trains)
    assert not any("encoder.layer.0." in n or "embeddings" in n for n in trains)
    assert not any(p.requires_grad for p in backbone.model.embeddings.parameters())
