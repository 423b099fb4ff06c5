"""Pretrained backbones and transfer controls: EfficientNet-Lite0's packaged ImageNet weights
(every key, and what only real weights give: a linear probe on real MNIST digits), ResNets in
torchvision's names (checkpoints written here with torchvision's published keys and shapes),
freezing, BatchNorm kept in evaluation mode, the backbone's learning rate and the unfreeze
schedule inside a real run."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from polytask.config import parse_config
from polytask.data.sources.mnist import load_mnist_5k
from polytask.errors import ConfigError
from polytask.models.efficientnet import EfficientNetLite0
from polytask.models.resnet import resnet18, resnet34, resnet50
from polytask.models.transfer import Backbone, Unfreeze, backbones
from polytask.models.weights import read_state_dict
from polytask.pretrained import packaged_weights
from polytask.run.build import build_model_for, build_optimization, seed_everything
from polytask.run.folder import RunFolder
from polytask.run.single import train_run
from polytask.tasks import TaskSpec


@pytest.fixture(scope="module", autouse=True)
def weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A weights cache of this module's own (the first load converts the packaged file)."""
    folder = tmp_path_factory.mktemp("weights-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLYTASK_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def lite0_imagenet(weights_cache: Path) -> EfficientNetLite0:
    return EfficientNetLite0((1, 28, 28), weights="imagenet", image_size=64).eval()


# ---------------------------------------------------------------- EfficientNet-Lite0


def test_packaged_weights_fill_every_key_and_are_cached(
    lite0_imagenet: EfficientNetLite0, weights_cache: Path
) -> None:
    shipped = read_state_dict(packaged_weights("efficientnet_lite0"))
    ours = lite0_imagenet.state_dict()
    assert set(ours) == {k for k in shipped if not k.startswith("_fc.")}
    assert len(ours) == 294  # 296 in the file: the classifier's weight and bias are dropped
    for key, tensor in ours.items():
        assert torch.equal(tensor, shipped[key]), key
    cached = weights_cache / "efficientnet_lite0.safetensors"
    assert cached.is_file()
    stamp = cached.stat().st_mtime_ns
    again = EfficientNetLite0((3, 32, 32), weights="imagenet")  # read from the cache
    assert cached.stat().st_mtime_ns == stamp
    assert torch.equal(
        again._blocks[9]._depthwise_conv.weight, shipped["_blocks.9._depthwise_conv.weight"]
    )


def _features(encoder: nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([encoder(chunk) for chunk in images.split(25)]).numpy()


def test_probe_on_frozen_imagenet_features_beats_random_features_on_real_mnist(
    lite0_imagenet: EfficientNetLite0,
) -> None:
    """A logistic-regression probe on frozen features of 300 real MNIST digits upscaled to
    64×64: the ImageNet weights' features are linearly separable, random ones are not."""
    from sklearn.linear_model import LogisticRegression

    digits, labels = load_mnist_5k()
    pick = np.random.default_rng(0).choice(len(labels), size=300, replace=False)
    images, y = torch.from_numpy(digits[pick])[:, None], labels[pick]
    torch.manual_seed(0)
    random_init = EfficientNetLite0((1, 28, 28), weights="none", image_size=64).eval()
    accuracy = {}
    for name, encoder in [("imagenet", lite0_imagenet), ("random", random_init)]:
        features = _features(encoder, images)
        mean, std = features[:200].mean(0), features[:200].std(0) + 1e-6
        features = (features - mean) / std
        probe = LogisticRegression(C=0.1, max_iter=500).fit(features[:200], y[:200])
        accuracy[name] = probe.score(features[200:], y[200:])
    assert accuracy["imagenet"] >= accuracy["random"] + 0.10, accuracy
    assert accuracy["imagenet"] >= 0.6, accuracy


def test_lite0_pads_like_tensorflow_same() -> None:
    enc = EfficientNetLite0((3, 33, 47), weights="none").eval()
    with torch.no_grad():
        assert enc.feature_map(torch.rand(1, 3, 33, 47)).shape == (1, 1280, 2, 2)


# ---------------------------------------------------------------- ResNet, torchvision's names


def torchvision_resnet18_keys() -> dict[str, tuple[int, ...]]:
    """torchvision's ``resnet18().state_dict()`` keys and shapes, written out from its
    published architecture (BasicBlock, layers [2, 2, 2, 2], widths 64..512, fc 512→1000)."""
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, width: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{name}"] = (width,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    c_in = 64
    for layer, width in zip((1, 2, 3, 4), (64, 128, 256, 512), strict=True):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            keys[f"{p}.conv1.weight"] = (width, c_in, 3, 3)
            bn(f"{p}.bn1", width)
            keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            if block == 0 and layer > 1:
                keys[f"{p}.downsample.0.weight"] = (width, c_in, 1, 1)
                bn(f"{p}.downsample.1", width)
            c_in = width
    keys["fc.weight"], keys["fc.bias"] = (1000, 512), (1000,)
    return keys


def torchvision_like_checkpoint(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchvision_resnet18_keys().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(shape, generator=generator)
    return state


def test_resnet18_has_torchvisions_keys_and_parameter_count() -> None:
    expected = torchvision_resnet18_keys()
    assert len(expected) == 122
    # torchvision's published size of ResNet-18: 11,689,512 parameters, fc included
    parameters = [k for k in expected if "running" not in k and "num_batches" not in k]
    assert sum(int(np.prod(expected[k])) for k in parameters) == 11_689_512
    ours = resnet18((3, 32, 32)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: s for k, s in expected.items() if not k.startswith("fc.")
    }


@pytest.mark.parametrize(("build", "published"), [(resnet34, 21_797_672), (resnet50, 25_557_032)])
def test_resnet34_and_50_have_torchvisions_published_sizes(build: Any, published: int) -> None:
    """torchvision's published parameter counts, its 1000-class ``fc`` included."""
    encoder = build((3, 32, 32))
    fc = encoder.out_features * 1000 + 1000
    assert sum(p.numel() for p in encoder.parameters()) + fc == published


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet18_loads_a_torchvision_checkpoint(tmp_path: Path, suffix: str) -> None:
    state = torchvision_like_checkpoint()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    encoder = resnet18((1, 32, 32), weights=str(path))
    loaded = encoder.state_dict()
    assert torch.equal(
        loaded["layer3.0.downsample.0.weight"], state["layer3.0.downsample.0.weight"]
    )
    assert torch.equal(loaded["bn1.running_var"], state["bn1.running_var"])
    assert encoder(torch.rand(2, 1, 32, 32)).shape == (2, 512)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("layer3.1.bn2.running_var"), "missing key 'layer3.1.bn2.running_var'"),
        (
            lambda s: s.__setitem__("layer2.0.conv1.weight", torch.zeros(128, 64, 1, 1)),
            "key 'layer2.0.conv1.weight' has shape (128, 64, 1, 1), expected (128, 64, 3, 3)",
        ),
        (lambda s: s.__setitem__("layer5.0.conv1.weight", torch.zeros(1)), "unexpected key"),
    ],
)
def test_a_wrong_checkpoint_is_one_line_naming_the_first_bad_key(
    tmp_path: Path, tiny_raw: dict[str, Any], edit: Any, message: str
) -> None:
    state = torchvision_like_checkpoint()
    edit(state)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError) as caught:
        resnet18((3, 32, 32), weights=str(path))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    raw = _image_raw(tiny_raw, encoder="resnet18", encoder_params={"weights": str(path)})
    with pytest.raises(
        ConfigError, match=r"^model\.encoder_params: cannot build encoder 'resnet18'"
    ):
        build_model_for(parse_config(raw), _TASKS, (1, 36, 36))


def test_a_pickle_of_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": torch.zeros(1), "what": object()}, path)
    with pytest.raises(ConfigError, match="cannot read it as a state dict"):
        read_state_dict(path)


# ---------------------------------------------------------------- transfer controls

_TASKS = [
    TaskSpec("left", "multiclass", num_classes=10),
    TaskSpec("right", "multiclass", num_classes=10),
]


def _image_raw(tiny_raw: dict[str, Any], **model: Any) -> dict[str, Any]:
    raw = copy.deepcopy(tiny_raw)
    raw["data"] = {
        "dataset": "multi-mnist",
        "params": {"num_train": 64, "num_val": 32, "num_test": 32},
        "standardize": False,
        "batch_size": 32,
    }
    raw["model"] = {"head": "linear", **model}
    raw["balancing"] = {"method": "equal"}
    raw["train"] = {**raw["train"], "epochs": 2, "grad_clip": None}
    return raw


def test_freeze_until_trains_the_named_module_and_after_with_frozen_bn_in_eval(
    tiny_raw: dict[str, Any],
) -> None:
    raw = _image_raw(
        tiny_raw,
        encoder="resnet18",
        transfer={"freeze": "until:layer4", "backbone_lr_ratio": 0.1},
    )
    config = parse_config(raw)
    model = build_model_for(config, _TASKS, (1, 36, 36))
    (backbone,) = backbones(model)
    trains = {n.split(".")[0] for n, p in backbone.named_parameters() if p.requires_grad}
    assert trains == {"layer4"}
    model.train()
    assert not backbone.bn1.training and not backbone.layer3[1].bn2.training  # frozen: eval
    assert backbone.layer4[0].bn1.training and backbone.training
    optimizer, _ = build_optimization(config, model, _balancer(config), steps_per_epoch=2)
    heads, body = optimizer.param_groups
    assert heads["lr"] == pytest.approx(0.01) and body["lr"] == pytest.approx(0.001)
    assert {id(p) for p in body["params"]} == {id(p) for p in backbone.layer4.parameters()}


def _balancer(config: Any) -> Any:
    from polytask.run.build import build_balancer_for

    return build_balancer_for(config, _TASKS)


def test_transfer_settings_are_checked(tiny_raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="needs freeze: all or until"):
        parse_config(_image_raw(tiny_raw, encoder="resnet18", transfer={"unfreeze_at_epoch": 2}))
    raw = _image_raw(tiny_raw, encoder="cnn", transfer={"freeze": "all"})
    with pytest.raises(ConfigError, match="'cnn' encoder is not a pretrained backbone"):
        build_model_for(parse_config(raw), _TASKS, (1, 36, 36))
    raw = _image_raw(tiny_raw, encoder="resnet18", transfer={"freeze": "all"})
    raw["balancing"] = {"method": "mgda"}
    config = parse_config(raw)
    model = build_model_for(config, _TASKS, (1, 36, 36))
    with pytest.raises(ConfigError, match="no shared parameter for the gradient method 'mgda'"):
        build_optimization(config, model, _balancer(config), steps_per_epoch=1)
    raw = _image_raw(tiny_raw, encoder="resnet18", transfer={"freeze": "until:layer9"})
    with pytest.raises(ConfigError, match=r"no module 'layer9'.*conv1, bn1, layer1"):
        build_model_for(parse_config(raw), _TASKS, (1, 36, 36))


def test_unfreeze_hook_returns_whether_it_changed_anything() -> None:
    class Tiny(Backbone):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(2, 2)

    model = nn.Sequential(Tiny(), nn.Linear(2, 1))
    model[0].freeze("all")
    hook = Unfreeze(model, at_epoch=3)
    assert [hook(1), hook(2), hook(3), hook(4)] == [False, False, True, False]
    assert all(p.requires_grad for p in model.parameters())


def _backbone_state(run_dir: Path, config: Any) -> dict[str, torch.Tensor]:
    model = build_model_for(config, _TASKS, (1, 36, 36))
    RunFolder(run_dir).load_weights(model, "last")
    return {k: v.clone() for k, v in backbones(model)[0].state_dict().items()}


@pytest.mark.parametrize("unfreeze", [None, 2])
def test_linear_probe_then_fine_tune_in_a_run(tiny_raw: dict[str, Any], unfreeze: Any) -> None:
    """Frozen all along, the backbone (BatchNorm statistics included) ends as it was built;
    unfrozen at epoch 2, its weights and statistics move."""
    transfer: dict[str, Any] = {"freeze": "all", "backbone_lr_ratio": 0.5}
    if unfreeze is not None:
        transfer["unfreeze_at_epoch"] = unfreeze
    config = parse_config(_image_raw(tiny_raw, encoder="resnet18", transfer=transfer))
    result = train_run(config)
    final = _backbone_state(result.run_dir, config)
    seed_everything(config.seed)
    initial = backbones(build_model_for(config, _TASKS, (1, 36, 36)))[0].state_dict()
    for key in ("conv1.weight", "layer2.0.bn1.running_mean", "layer4.1.conv2.weight"):
        assert torch.equal(final[key], initial[key]) == (unfreeze is None), key
