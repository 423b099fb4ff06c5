"""The layer-wise Gramian on every shipped encoder × architecture, against the batched Jacobian
in float64; and PCGrad/GradVac as Gramian weightings, to 1e-10 of their Jacobian path."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from polytask.balancing import BALANCERS
from polytask.balancing import sources as sources_module
from polytask.balancing.jacobian import flatten_jacobian, task_jacobian
from polytask.balancing.layerwise import LayerwiseGramian
from polytask.errors import PolytaskError
from polytask.models import ARCHITECTURES, ENCODERS, build_model
from polytask.tasks import TaskSpec

B = 6
TASKS = [
    TaskSpec("click", "binary"),
    TaskSpec("conversion", "binary"),
    TaskSpec("digit", "multiclass", num_classes=3),
    TaskSpec("price", "regression"),
]
TABULAR_SPEC: dict[str, Any] = {
    "numeric": {"shape": [3]},
    "categorical": {"shape": [3], "cardinalities": [5, 4, 30], "columns": ["a", "b", "c"]},
}
AUDIO_SPEC = {"audio": {"shape": [2000], "sample_rate": 8000}}
TEXT_SPEC = {"text": {"shape": [6], "vocab_size": 30, "pad_id": 0}}
FUSION_SPEC = {"image": {"shape": [1, 8, 8]}, **TEXT_SPEC}


def _text(g: torch.Generator) -> Tensor:
    ids = torch.randint(1, 30, (B, 6), generator=g)
    ids[:, 4:] = 0  # padding
    return ids


@dataclass(frozen=True)
class Encoder:
    """A shipped encoder, tiny: its input shape (or spec), parameters and a batch maker."""

    name: str
    shape: Any
    params: dict[str, Any] = field(default_factory=dict)
    batch: Callable[[torch.Generator], Any] = lambda g: torch.randn(B, 5, generator=g)
    #: float64 but where the encoder computes in float32 by design (audio_cnn's log-mel)
    dtype: torch.dtype = torch.float64
    #: the architectures to test it with (None: every registered one)
    architectures: tuple[str, ...] | None = None


def _image(g: torch.Generator) -> Tensor:
    return torch.rand(2, 3, 32, 32, generator=g)


ENCODER_CASES = [
    Encoder("mlp", (5,), {"hidden": [8, 6], "batch_norm": True}),
    Encoder(
        "cnn",
        (1, 8, 8),
        {"channels": [3, 4], "out_features": 6},
        lambda g: torch.randn(B, 1, 8, 8, generator=g),
    ),
    Encoder(
        "resnet", (1, 8, 8), {"channels": [3, 4]}, lambda g: torch.randn(B, 1, 8, 8, generator=g)
    ),
    Encoder(
        "augmented",
        (1, 8, 8),
        {"encoder": {"name": "cnn", "params": {"channels": [3]}}, "augment": {"flip": 0.5}},
        lambda g: torch.rand(B, 1, 8, 8, generator=g),
    ),
    Encoder(
        "tabular",
        TABULAR_SPEC,
        {"hidden": [8]},
        lambda g: {
            "numeric": torch.randn(B, 3, generator=g),
            "categorical": torch.stack(
                [torch.randint(0, c, (B,), generator=g) for c in (5, 4, 30)], dim=1
            ),
        },
    ),
    Encoder(
        "audio_cnn",
        AUDIO_SPEC,
        {"channels": [3], "out_features": 6},
        lambda g: {"audio": torch.randn(B, 2000, generator=g)},
        dtype=torch.float32,
    ),
    Encoder(
        "transformer",
        TEXT_SPEC,
        {"d_model": 8, "heads": 2, "layers": 1, "feedforward": 12, "dropout": 0.0},
        lambda g: {"text": _text(g)},
    ),
    Encoder(
        "fusion",
        FUSION_SPEC,
        {
            "mode": "gated",
            "d_model": 6,
            "encoders": {
                "image": {"name": "cnn", "params": {"channels": [3], "out_features": 6}},
                "text": {"name": "transformer", "params": {"d_model": 6, "heads": 2, "layers": 1}},
            },
        },
        lambda g: {"image": torch.rand(B, 1, 8, 8, generator=g), "text": _text(g)},
    ),
    # the large backbones (random weights), with one architecture: their layers are the point
    Encoder("resnet18", (3, 32, 32), {}, _image, architectures=("hard_sharing",)),
    Encoder(
        "efficientnet_lite0",
        (3, 32, 32),
        {"weights": "none"},
        _image,
        architectures=("hard_sharing",),
    ),
]
#: encoders not run here, and why
UNCOVERED = {
    "minilm": "needs a pretrained checkpoint on disk (tests/test_text.py builds one)",
    "hf": "needs a Hugging Face model folder on disk (tests/test_hf_text.py builds one)",
    "resnet34": "resnet18's layer types, deeper (checked below); too large for the test budget",
    "resnet50": "resnet18's layer types in bottlenecks (checked below); too large for the budget",
}
#: the encoder cases a layered architecture takes (it refuses the others in one line: see
#: ``test_refused_pairs_are_refused_at_build_time``); dense_mtan takes only dense_cnn and
#: per-pixel tasks (tested below with the dense encoder)
TAKES = {"mtan": {"cnn", "resnet"}, "cross_stitch": {"mlp", "cnn", "resnet", "tabular"}}
DENSE_ARCHITECTURES = {"dense_mtan"}
PAIRS = [
    (encoder, architecture)
    for encoder in ENCODER_CASES
    for architecture in encoder.architectures or ARCHITECTURES.names()
    if architecture not in DENSE_ARCHITECTURES
]
CASES = [(e, a) for e, a in PAIRS if e.name in TAKES.get(a, {e.name})]
REFUSED = [(e, a) for e, a in PAIRS if e.name not in TAKES.get(a, {e.name})]


#: encoders for dense (per-pixel) tasks, with the dense head: tested on their own below
DENSE = {"dense_cnn"}


def test_every_shipped_encoder_has_a_case() -> None:
    covered = {c.name for c in ENCODER_CASES} | UNCOVERED.keys() | DENSE
    assert covered == set(ENCODERS.names())


def test_the_dense_encoder_and_heads_equal_the_jacobian_path() -> None:
    torch.manual_seed(0)
    tasks = [TaskSpec("seg", "segmentation", num_classes=3), TaskSpec("depth", "depth")]
    model = build_model(
        tasks,
        (3, 8, 8),
        encoder="dense_cnn",
        head="dense",
        encoder_params={"channels": [3, 3, 3], "out_features": 4},
    ).double()
    engine = LayerwiseGramian.attach(model, active=lambda: True, owner="test")
    assert engine is not None
    out = model(torch.rand(2, 3, 8, 8, dtype=torch.float64)).outputs
    losses = torch.stack([out[t.name].pow(2).mean() + out[t.name].mean() for t in tasks])
    shared = [p for p in model.shared_parameters() if p.requires_grad]
    jacobian = flatten_jacobian(task_jacobian(losses, shared, retain_graph=True), shared, 2)
    step = engine.step(losses, 1.0, shared, owner="test")
    assert step is not None and engine.failed is None
    expected = jacobian @ jacobian.T
    assert float((step.gramian - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_the_larger_resnets_hold_parameters_in_resnet18s_layer_types(name: str) -> None:
    def kinds(name: str) -> set[type]:
        encoder = ENCODERS.get(name)((3, 32, 32))
        return {
            type(m)
            for m in encoder.modules()
            if next(m.parameters(recurse=False), None) is not None
        }

    assert kinds(name) <= kinds("resnet18")


def _cast(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, dict):
        return {k: _cast(v, dtype) for k, v in batch.items()}
    return batch.to(dtype) if batch.is_floating_point() else batch


def _labels(g: torch.Generator, n: int, dtype: torch.dtype) -> dict[str, Tensor]:
    return {
        "click": torch.randint(0, 2, (n,), generator=g).to(dtype),
        "conversion": torch.randint(0, 2, (n,), generator=g).to(dtype),
        "digit": torch.randint(0, 3, (n,), generator=g),
        "price": torch.randn(n, generator=g, dtype=dtype),
    }


def _build(encoder: Encoder, architecture: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(
        TASKS,
        encoder.shape,
        encoder=encoder.name,
        encoder_params=dict(encoder.params),
        architecture=architecture,
    )
    return model.to(encoder.dtype)


@pytest.mark.parametrize(
    ("encoder", "architecture"), REFUSED, ids=[f"{e.name}-{a}" for e, a in REFUSED]
)
def test_refused_pairs_are_refused_at_build_time(encoder: Encoder, architecture: str) -> None:
    """The pairs left out of the Jacobian comparison are the ones the architecture cannot
    build (e.g. cross-stitch needs an encoder it can split in stages), with one line."""
    with pytest.raises(PolytaskError) as error:
        _build(encoder, architecture)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("encoder", "architecture"), CASES, ids=[f"{e.name}-{a}" for e, a in CASES]
)
def test_layerwise_gramian_and_update_equal_the_jacobian_path(
    encoder: Encoder, architecture: str
) -> None:
    """Every shared parameter on the δ path or the parameter path, none on the fallback; the
    Gramian and the update ``wᵀJ`` equal the batched Jacobian's to 1e-5 (float64)."""
    model = _build(encoder, architecture)
    tol = 1e-5 if encoder.dtype == torch.float64 else 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning, at attach or at the step
        engine = LayerwiseGramian.attach(model, active=lambda: True, owner="test")
        assert engine is not None
        g = torch.Generator().manual_seed(1)
        x = _cast(encoder.batch(g), encoder.dtype)
        out = model(x).outputs
        n = next(iter(out.values())).shape[0]
        y = _labels(g, n, encoder.dtype)
        losses = torch.stack([t.compute_loss(out[t.name], y[t.name])[0] for t in TASKS])
        shared = [p for p in model.shared_parameters() if p.requires_grad]
        blocks = task_jacobian(losses, shared, retain_graph=True)
        jacobian = flatten_jacobian(blocks, shared, len(TASKS))
        step = engine.step(losses, 1.0, shared, owner="test")
    assert step is not None and engine.failed is None
    expected = jacobian @ jacobian.T
    assert float((step.gramian - expected).abs().max()) <= tol * float(expected.abs().max())
    weights = torch.tensor([0.7, -0.2, 1.3, 0.4], dtype=step.gramian.dtype)
    model.zero_grad(set_to_none=True)
    step.apply(weights)
    update = torch.cat([p.grad.reshape(-1) for p in shared])
    reference = weights @ jacobian
    assert float((update - reference).abs().max()) <= tol * float(reference.abs().max())


def _steps(method: str, autogram: bool) -> tuple[list[Tensor], list[list[Tensor]], nn.Module]:
    """Weights and shared gradients of 4 float64 steps of a CNN (tasks absent on odd steps)."""
    torch.manual_seed(0)
    model = build_model(
        TASKS, (1, 8, 8), encoder="cnn", encoder_params={"channels": [3], "out_features": 6}
    ).double()
    balancer = BALANCERS.get(method)(TASKS)
    balancer.use_autogram = autogram
    balancer.attach(model)
    g = torch.Generator().manual_seed(2)
    weights, grads = [], []
    for step in range(4):
        out = model(torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)).outputs
        y = _labels(g, B, torch.float64)
        if step % 2:
            y["digit"][:] = -1  # absent: the method's per-task state follows its tasks
        pairs = [t.compute_loss(out[t.name], y[t.name]) for t in TASKS]
        losses = torch.stack([loss for loss, _ in pairs])
        present = torch.tensor([bool(count > 0) for _, count in pairs])
        model.zero_grad(set_to_none=True)
        result = balancer.backward(losses, shared_params=model.shared_parameters(), present=present)
        weights.append(result.weights.clone())
        grads.append([p.grad.clone() for p in model.shared_parameters()])
    return weights, grads, balancer


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_pcgrad_and_gradvac_on_the_layerwise_path_equal_their_jacobian_path(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    w_ref, g_ref, ref = _steps(method, False)
    taken = []
    original = sources_module.unscaled_jacobian
    monkeypatch.setattr(
        sources_module,
        "unscaled_jacobian",
        lambda *a, **k: taken.append(1) or original(*a, **k),
    )
    w, g, balancer = _steps(method, True)
    assert balancer.gramian_source.ready and not taken  # the Gramian path on every step
    for a, b in zip(w, w_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))
    for step_a, step_b in zip(g, g_ref, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max()) + 1e-300
    state, state_ref = balancer.state_dict(), ref.state_dict()
    assert state.keys() == state_ref.keys()
    for name in state:  # the random stream (PCGrad) and the EMA targets (GradVac)
        assert torch.allclose(state[name].double(), state_ref[name].double(), rtol=1e-10), name
