"""Properties every registered architecture must have, run over the whole registry.

A registered architecture without a case below is tested with a small MLP encoder and no
parameters; give it a case when it needs another encoder or parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import polytask.models.cross_stitch
import polytask.models.esmm
import polytask.models.experts
import polytask.models.mtan  # noqa: F401  (importing registers the architectures)
from polytask.balancing import BALANCERS, GramianWeightingAggregator
from polytask.models import ARCHITECTURES, MultiTaskModel, build_model
from polytask.models.encoders import CNNEncoder, MLPEncoder, ResNetEncoder
from polytask.models.heads import linear_head
from polytask.tasks import TaskSpec
from polytask.train.checkpoint import load_checkpoint, save_checkpoint

MINE = {"mmoe", "cgc", "ple", "cross_stitch", "mtan", "esmm"}
B = 6
TASKS = [
    TaskSpec("click", "binary"),
    TaskSpec("conversion", "binary"),
    TaskSpec("digit", "multiclass", num_classes=3),
    TaskSpec("tags", "multilabel", num_classes=2),
    TaskSpec("price", "regression"),
]
SHAPES = {"click": (B,), "conversion": (B,), "digit": (B, 3), "tags": (B, 2), "price": (B,)}
TABULAR = (5,)
IMAGE = (1, 8, 8)


def mlp() -> nn.Module:
    return MLPEncoder(TABULAR, hidden=(8, 6), activation="gelu")  # no dead units


def cnn() -> nn.Module:
    return CNNEncoder(IMAGE, channels=(3, 4), out_features=6)


def resnet() -> nn.Module:
    return ResNetEncoder(IMAGE, channels=(3, 4))


@dataclass(frozen=True)
class Case:
    name: str
    make_encoder: Callable[[], nn.Module] = mlp
    params: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = TABULAR
    id: str = ""


SPECIAL = [
    Case("mmoe", params={"num_experts": 3}),
    Case("mmoe", params={"num_experts": 3, "gate": "dselect_k", "k": 2}, id="mmoe-dselect"),
    Case("mmoe", cnn, {"num_experts": 2}, IMAGE, id="mmoe-cnn"),
    Case("cgc", params={"experts_per_task": 2, "shared_experts": 2}),
    Case("ple"),
    Case("ple", params={"num_levels": 3, "shared_experts": 2}, id="ple-3"),
    Case("ple", params={"gate": "dselect_k", "k": 2, "shared_experts": 3}, id="ple-dselect"),
    Case("cross_stitch"),
    Case("cross_stitch", cnn, {"self_weight": 0.8}, IMAGE, id="cross_stitch-cnn"),
    Case("mtan", cnn, input_shape=IMAGE),
    Case("mtan", resnet, input_shape=IMAGE, id="mtan-resnet"),
    Case("esmm"),
]
#: architectures of per-pixel tasks only (the per-sample tasks above do not apply): each has its
#: own tests (dense_mtan: tests/test_dense.py)
DENSE_ONLY = {"dense_mtan"}
CASES = SPECIAL + [
    Case(name)
    for name in ARCHITECTURES.names()
    if name not in {c.name for c in SPECIAL} | DENSE_ONLY
]
IDS = [c.id or c.name for c in CASES]
GATED = [c for c in CASES if c.name in {"mmoe", "cgc", "ple"}]


def build(case: Case, seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    model = ARCHITECTURES.get(case.name)(
        tasks=TASKS,
        make_encoder=case.make_encoder,
        make_head=lambda task, width: linear_head(width, task),
        **case.params,
    )
    return model  # type: ignore[no-any-return]


def batch(case: Case, seed: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *case.input_shape, generator=g)
    y = {
        "click": torch.randint(0, 2, (B,), generator=g).float(),
        "conversion": torch.randint(0, 2, (B,), generator=g).float(),
        "digit": torch.randint(0, 3, (B,), generator=g),
        "tags": torch.randint(0, 2, (B, 2), generator=g).float(),
        "price": torch.randn(B, generator=g),
    }
    return x, y


def task_losses(model: MultiTaskModel, x: Tensor, y: dict[str, Tensor]) -> dict[str, Tensor]:
    out = model(x).outputs
    return {t.name: t.compute_loss(out[t.name], y[t.name])[0] for t in TASKS}


class MeanWeighting(GramianWeightingAggregator):
    """Every present task weighted 1/K: the update is the gradient of the mean loss."""

    def weights_from_gramian(
        self, gramian: Tensor, losses: Tensor, rows: Tensor | None = None
    ) -> Tensor:
        k = gramian.shape[0]
        return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device)


def assert_finite_grads(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------- registry


def test_my_architectures_are_registered_with_checked_parameters() -> None:
    assert set(ARCHITECTURES.names()) >= MINE
    for case in CASES:
        assert ARCHITECTURES.check_params(case.name, case.params) == []
    for name in MINE:
        entry = next(e for e in ARCHITECTURES if e.name == name)
        assert entry.description and "(" in entry.description  # cites the paper
        assert not {"tasks", "make_encoder", "make_head"} & set(ARCHITECTURES.parameters(name))


@pytest.mark.parametrize(
    ("name", "encoder", "input_shape", "encoder_params"),
    [
        ("mmoe", "mlp", TABULAR, {"hidden": [6]}),
        ("cgc", "mlp", TABULAR, {"hidden": [6]}),
        ("ple", "mlp", TABULAR, {"hidden": [6]}),
        ("cross_stitch", "mlp", TABULAR, {"hidden": [6, 6]}),
        ("mtan", "resnet", IMAGE, {"channels": [3, 4]}),
        ("esmm", "mlp", TABULAR, {"hidden": [6]}),
    ],
)
def test_build_model_by_name(name, encoder, input_shape, encoder_params) -> None:
    model = build_model(
        TASKS, input_shape, encoder=encoder, encoder_params=encoder_params, architecture=name
    )
    out = model(torch.randn(B, *input_shape))
    assert {k: tuple(v.shape) for k, v in out.outputs.items()} == SHAPES


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_have_each_task_kinds_shape(case: Case) -> None:
    model = build(case)
    x, _ = batch(case)
    out = model(x)
    assert {k: tuple(v.shape) for k, v in out.outputs.items()} == SHAPES
    if out.features is not None:
        assert out.features.shape[0] == B
    shared = {id(p) for p in model.shared_parameters()}
    task = {id(p) for p in model.task_parameters()}
    assert shared and shared.isdisjoint(task)
    assert shared | task == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_parameter_gets_a_gradient(case: Case) -> None:
    model = build(case)
    x, y = batch(case)
    sum(task_losses(model, x, y).values()).backward()  # type: ignore[union-attr]
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_loss_weighting_gives_finite_gradients(case: Case) -> None:
    model = build(case)
    x, y = batch(case)
    BALANCERS.get("equal")(TASKS).backward(task_losses(model, x, y))
    assert_finite_grads(model)
    assert all(p.grad is not None for p in model.shared_parameters())


def _reference_grads(
    model: MultiTaskModel, losses: dict[str, Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """(gradient of the mean loss for the shared parameters, of the summed loss for the task
    parameters): what an aggregator weighting every task 1/K must produce."""
    vector = torch.stack(list(losses.values()))
    shared = model.shared_parameters()
    task = list(model.task_parameters())
    mean = torch.autograd.grad(vector.mean(), shared, retain_graph=True)
    total = torch.autograd.grad(vector.sum(), task, retain_graph=True)
    return list(mean), list(total)


#: architectures without one tensor that separates shared from task parameters
NO_FEATURES = {"cross_stitch"}
LEVELS = [
    pytest.param(case, level, id=f"{case.id or case.name}-{level}")
    for case in CASES
    for level in ("parameters", "features")
    if not (level == "features" and case.name in NO_FEATURES)
]


def test_architectures_without_features_say_so() -> None:
    for case in CASES:
        if case.name in NO_FEATURES:
            model = build(case)
            x, _ = batch(case)
            assert model(x).features is None


@pytest.mark.parametrize(("case", "level"), LEVELS)
def test_gradient_aggregation_matches_the_mean_gradient(case: Case, level: str) -> None:
    """A gradient method weighting tasks equally must update the shared parameters with the
    gradient of the mean loss and the task parameters with their own losses' gradient, at both
    levels: this checks that ``shared_parameters()`` and ``features`` are consistent (features is
    a cut of the graph between the shared and the task-specific parameters)."""
    model = build(case)
    x, y = batch(case)
    out = model(x)
    losses = {t.name: t.compute_loss(out.outputs[t.name], y[t.name])[0] for t in TASKS}
    expected_shared, expected_task = _reference_grads(model, losses)
    aggregator = MeanWeighting(TASKS, level=level)  # type: ignore[arg-type]
    aggregator.attach(model)
    aggregator.backward(losses, shared_params=model.shared_parameters(), features=out.features)
    for p, g in zip(model.shared_parameters(), expected_shared, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
    for p, g in zip(model.task_parameters(), expected_task, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_missing_labels_give_a_zero_loss_and_finite_gradients(case: Case) -> None:
    model = build(case)
    x, y = batch(case)
    y["digit"] = torch.full((B,), -1)
    y["price"] = torch.full((B,), math.nan)
    losses = task_losses(model, x, y)
    assert losses["digit"].item() == 0.0 and losses["price"].item() == 0.0
    sum(losses.values()).backward()  # type: ignore[union-attr]
    assert_finite_grads(model)

    model.zero_grad()
    out = model(x)
    losses, present = {}, []
    for t in TASKS:
        losses[t.name], count = t.compute_loss(out.outputs[t.name], y[t.name])
        present.append(bool(count > 0))
    aggregator = MeanWeighting(TASKS)
    aggregator.attach(model)
    result = aggregator.backward(
        losses, shared_params=model.shared_parameters(), present=torch.tensor(present)
    )
    torch.testing.assert_close(result.weights, torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3, 0.0]))
    assert_finite_grads(model)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_round_trip_through_a_checkpoint(case: Case, tmp_path: Path) -> None:
    model = build(case, seed=0)
    x, _ = batch(case)
    model(x)  # move the batch-norm statistics away from their initial values
    model.eval()
    save_checkpoint(tmp_path / "model.safetensors", {"model": model.state_dict()})
    fresh = build(case, seed=123).eval()
    fresh.load_state_dict(load_checkpoint(tmp_path / "model.safetensors")["model"])
    with torch.no_grad():
        before, after = model(x), fresh(x)
    for name in SHAPES:
        torch.testing.assert_close(after.outputs[name], before.outputs[name], rtol=0, atol=0)
    if before.features is not None:
        torch.testing.assert_close(after.features, before.features, rtol=0, atol=0)


@pytest.mark.parametrize("case", GATED, ids=[c.id or c.name for c in GATED])
def test_gate_weights_are_distributions_over_the_experts(case: Case) -> None:
    model = build(case)
    x, _ = batch(case)
    out = model(x)
    assert out.extras is not None
    gates = out.extras["gates"]
    assert set(gates) == set(SHAPES)
    for weights in gates.values():
        assert weights.dim() == 2 and weights.shape[0] == B
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(B))
