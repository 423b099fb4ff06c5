"""Multimodal: the fusion encoder (concat, gated, cross-attention; missing modalities),
multimodal-digits and the multimodal recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from polytask.cli import app
from polytask.data.bundle import build_bundle
from polytask.data.sources import DATASETS
from polytask.errors import ConfigError
from polytask.models import build_model
from polytask.models.fusion import FUSION_MODES, FusionEncoder, resolve_block
from polytask.tasks import TaskSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = {
    "image": {"shape": [1, 8, 8]},
    "audio": {"shape": [2000], "sample_rate": 8000},
    "text": {"shape": [6], "vocab_size": 30, "pad_id": 0},
    "image_present": {"shape": []},
}
ENCODERS = {
    "image": {"name": "cnn", "params": {"channels": [4], "out_features": 8}},
    "audio": {"name": "audio_cnn", "params": {"channels": [4], "out_features": 8}},
    "text": {"name": "transformer", "params": {"d_model": 8, "heads": 2, "layers": 1}},
}


def batch(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 30, (n, 6), generator=g)
    text[:, 4:] = 0
    return {
        "image": torch.rand(n, 1, 8, 8, generator=g),
        "audio": torch.randn(n, 2000, generator=g),
        "text": text,
        "image_present": torch.tensor([1.0, 0.0] * (n // 2)),
    }


def fusion(mode: str, **kw) -> FusionEncoder:
    torch.manual_seed(0)
    return FusionEncoder(SPEC, encoders=ENCODERS, mode=mode, d_model=8, heads=2, **kw)


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_fusion_shape_and_gradient(mode: str) -> None:
    enc = fusion(mode)
    out = enc(batch())
    width = 3 * 8 if mode == "concat" else 8
    assert out.shape == (6, width) and enc.out_features == width
    out.sum().backward()
    assert [n for n, p in enc.named_parameters() if p.grad is None] == []
    assert fusion(mode, out_features=5)(batch()).shape == (6, 5)


@pytest.mark.parametrize("mode", FUSION_MODES)
@pytest.mark.parametrize("training", [True, False])
def test_a_missing_blocks_garbage_does_not_leak_in(mode: str, training: bool) -> None:
    enc = fusion(mode).train(training)
    clean = batch()
    dirty = {k: v.clone() for k, v in clean.items()}
    gone = clean["image_present"] == 0
    dirty["image"][gone] = float("nan")  # garbage in the samples flagged as lacking the image
    outputs = []
    for x in (clean, dirty):
        torch.manual_seed(1)  # the same dropout / masks in training mode
        outputs.append(enc(x))
    assert torch.isfinite(outputs[1]).all()
    assert torch.equal(outputs[0], outputs[1])
    outputs[1].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_fusion_output_ignores_what_a_missing_block_holds(mode: str) -> None:
    enc = fusion(mode).eval()
    x = batch()
    y = {k: v.clone() for k, v in x.items()}
    gone = x["image_present"] == 0
    y["image"][gone] = torch.rand_like(y["image"][gone]) * 100.0
    assert torch.allclose(enc(x), enc(y))
    # ... while a present block does matter
    y["image"][~gone] = torch.rand_like(y["image"][~gone])
    assert not torch.allclose(enc(x)[~gone], enc(y)[~gone])


def test_presence_is_inferred_from_all_zero_blocks() -> None:
    enc = fusion("concat")
    x = batch()
    x["text"][1] = 0  # an all-padding text
    x["audio"][3] = 0.0
    present = enc.presence(x)
    assert present[:, 0].tolist() == [True, False] * 3  # image: its flag
    assert present[:, 1].tolist() == [True, True, True, False, True, True]  # audio
    assert present[:, 2].tolist() == [True, False, True, True, True, True]  # text


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_a_sample_with_every_block_missing(mode: str) -> None:
    enc = fusion(mode).eval()
    x = batch(2)
    x["image_present"] = torch.zeros(2)
    x["audio"][:] = 0.0
    x["text"][:] = 0
    out = enc(x)
    assert torch.isfinite(out).all()
    if mode == "concat":  # the learned "missing" vectors, side by side
        assert torch.equal(out[0], enc.missing.flatten())
    if mode == "gated":
        assert out.abs().sum() == 0


def test_fusion_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="fusion encoder needs named input blocks"):
        FusionEncoder((4,), encoders={"x": "mlp"})
    with pytest.raises(ConfigError, match=r"no input block\(s\) \['video'\]"):
        FusionEncoder(SPEC, encoders={**ENCODERS, "video": "cnn"})
    with pytest.raises(ConfigError, match=r"input block\(s\) \['text'\] have no encoder"):
        FusionEncoder(SPEC, encoders={k: v for k, v in ENCODERS.items() if k != "text"})
    with pytest.raises(ConfigError, match="mode must be one of"):
        FusionEncoder(SPEC, encoders=ENCODERS, mode="sum")
    with pytest.raises(ConfigError, match=r"fusion\.encoders\.audio: unknown parameter 'bins'"):
        FusionEncoder(
            SPEC, encoders={**ENCODERS, "audio": {"name": "audio_cnn", "params": {"bins": 2}}}
        )
    with pytest.raises(ConfigError, match="set its `block`"):
        resolve_block("transformer", {"a": {"shape": [3]}, "b": {"shape": [3]}}, None)


@pytest.mark.parametrize("architecture", ["hard_sharing", "mmoe", "cgc", "ple"])
def test_fusion_in_shared_architectures(architecture: str) -> None:
    tasks = [TaskSpec("a", "multiclass", num_classes=3), TaskSpec("b", "binary")]
    model = build_model(
        tasks,
        SPEC,
        encoder="fusion",
        encoder_params={"encoders": ENCODERS, "mode": "gated", "d_model": 8},
        architecture=architecture,
    )
    out = model(batch())
    assert out.outputs["a"].shape == (6, 3)
    sum(o.sum() for o in out.outputs.values()).backward()
    assert all(p.grad is not None for p in model.shared_parameters())


# ----------------------------------------------------------------------------- dataset
SMALL = {"num_train": 60, "num_val": 20, "num_test": 20}


def test_multimodal_digits_is_deterministic_by_seed() -> None:
    a = DATASETS.get("multimodal-digits")(seed=1, **SMALL)
    b = DATASETS.get("multimodal-digits")(seed=1, **SMALL)
    c = DATASETS.get("multimodal-digits")(seed=2, **SMALL)
    for key in a.inputs:
        np.testing.assert_array_equal(a.inputs[key], b.inputs[key])
    for name in a.targets:
        np.testing.assert_array_equal(a.targets[name], b.targets[name])
    assert not np.array_equal(a.inputs["image"], c.inputs["image"])


def test_multimodal_digits_tasks_need_both_modalities() -> None:
    t = DATASETS.get("multimodal-digits")(seed=0, missing_modality=0.3, **SMALL)
    image_ok, audio_ok = t.inputs["image_present"], t.inputs["audio_present"]
    assert image_ok.dtype == bool and not (~image_ok & ~audio_ok).any()  # one at most missing
    assert 10 < (~image_ok | ~audio_ok).sum() < 50
    assert (t.targets["image_digit"][~image_ok] == -1).all()
    assert (t.targets["paired_digit"][~audio_ok] == -1).all()
    assert not np.abs(t.inputs["image"][~image_ok]).any()
    assert not np.abs(t.inputs["audio"][~audio_ok]).any()
    both = image_ok & audio_ok
    assert np.isnan(t.targets["match"][~both]).all()
    same = t.targets["image_digit"][both] == t.targets["paired_digit"][both]
    np.testing.assert_array_equal(t.targets["match"][both], same.astype(np.float32))
    assert 0.3 < same.mean() < 0.7
    bundle = build_bundle(t, seed=0)
    assert bundle.info["sizes"] == {"train": 60, "val": 20, "test": 20}
    assert bundle.input_shape["audio"]["sample_rate"] == 8000


def test_multimodal_digits_with_text_trains_a_fusion_model() -> None:
    t = DATASETS.get("multimodal-digits")(seed=0, pair_with="text", missing_modality=0.2, **SMALL)
    assert t.inputs["text"][0] and "" in t.inputs["text"]
    bundle = build_bundle(t, seed=0)
    model = build_model(
        bundle.tasks,
        bundle.input_shape,
        encoder="fusion",
        encoder_params={
            "encoders": {
                "image": {"name": "cnn", "params": {"channels": [4], "out_features": 8}},
                "text": {"name": "transformer", "params": {"d_model": 8, "heads": 2}},
            },
            "mode": "cross_attention",
            "d_model": 8,
            "heads": 2,
        },
    )
    x, y = bundle.train.take(torch.arange(16))
    out = model(x)
    losses = [task.compute_loss(out.outputs[task.name], y[task.name])[0] for task in bundle.tasks]
    sum(losses).backward()
    assert all(torch.isfinite(loss) for loss in losses)


# ----------------------------------------------------------------------------- recipe
def test_multimodal_recipe_trains_one_tiny_epoch(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "configs" / "multimodal.yaml").read_text())
    raw["data"]["params"].update(num_train=100, num_val=30, num_test=30)
    raw["train"] = {**raw["train"], "epochs": 1, "progress": False}
    raw["output_dir"] = str(tmp_path)
    path = tmp_path / "multimodal.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "match" in result.output
