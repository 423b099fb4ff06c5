"""The layer-wise Gramian (``layerwise.py``, "autogram") and the engine's choice of source: equal
to the batched Jacobian's Gramian, and the same updates."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.balancing import BALANCERS
from polytask.balancing import sources as sources_module
from polytask.balancing.jacobian import flatten_jacobian, gramian, task_jacobian
from polytask.balancing.layerwise import LayerwiseGramian
from polytask.models import build_model
from polytask.tasks import TaskSpec

TASKS = [
    TaskSpec("r", "regression"),
    TaskSpec("c", "multiclass", num_classes=3),
    TaskSpec("b", "binary"),
    TaskSpec("m", "multilabel", num_classes=4),
]
METHODS = ["mgda", "nash_mtl", "upgrad", "cagrad", "imtl_g", "aligned_mtl", "dualproj", "fairgrad"]


def _labels(n: int, g: torch.Generator, *, missing: bool) -> dict[str, Tensor]:
    y = {
        "r": torch.randn(n, generator=g),
        "c": torch.randint(0, 3, (n,), generator=g),
        "b": torch.randint(0, 2, (n,), generator=g).float(),
        "m": torch.randint(0, 2, (n, 4), generator=g).float(),
    }
    if missing:
        y["r"][: n // 2] = float("nan")  # some labels missing
        y["c"][:] = -1  # a task absent from the whole batch
    return y


def _losses(model: nn.Module, x: Tensor, y: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    out = model(x).outputs
    pairs = [t.compute_loss(out[t.name], y[t.name]) for t in TASKS]
    losses = torch.stack([loss for loss, _ in pairs])
    present = torch.tensor([bool(count > 0) for _, count in pairs])
    return losses, present


def _mlp(**encoder_params: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(TASKS, (6,), encoder_params={"hidden": [16, 12], **encoder_params})


def _train(
    method: str,
    autogram: bool,
    *,
    make_model=_mlp,
    input_shape: tuple[int, ...] = (6,),
    steps: int = 2,
    missing: bool = True,
    scale: float = 1.0,
    params: dict | None = None,
) -> tuple[list[Tensor], list[dict[str, Tensor]], object]:
    """Weights and gradients of ``steps`` steps (the model is not updated between them)."""
    model = make_model()
    balancer = BALANCERS.get(method)(TASKS, **(params or {}))
    balancer.use_autogram = autogram
    balancer.attach(model)
    g = torch.Generator().manual_seed(1)
    weights, grads = [], []
    for step in range(steps):
        x = torch.randn(10, *input_shape, generator=g)
        losses, present = _losses(model, x, _labels(10, g, missing=missing and step % 2 == 0))
        model.zero_grad(set_to_none=True)
        result = balancer.backward(
            losses, shared_params=model.shared_parameters(), present=present, grad_scale=scale
        )
        weights.append(result.weights.clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return weights, grads, balancer


def _assert_same(
    a: dict[str, Tensor], b: dict[str, Tensor], rel: float = 1e-5, *, overall: bool = False
) -> None:
    """``a == b`` to ``rel`` of each gradient's largest entry (``overall``: of the largest entry
    of all of them, for gradients that are zero up to rounding, as a bias before BatchNorm)."""
    assert a.keys() == b.keys()
    top = max(float(t.abs().max()) for t in b.values())
    for name in a:
        scale = (top if overall else float(b[name].abs().max())) + 1e-12
        assert float((a[name] - b[name]).abs().max()) <= rel * scale, name


class _Reused(nn.Module):
    """A shared Linear applied to a 3-d input and called twice, then tanh; linear heads."""

    def __init__(self, tasks: list[TaskSpec]) -> None:
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.second = nn.Linear(8, 8)
        self.heads = nn.ModuleDict({t.name: nn.Linear(8, t.output_dim) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = torch.tanh(self.first(x.view(x.shape[0], 2, 3).repeat(1, 1, 2)))  # [B, 2, 8]
        h = torch.tanh(self.second(self.second(h))).mean(1)  # one layer, two calls
        return {n: head(h) for n, head in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.first.parameters(), *self.second.parameters()]


@pytest.mark.parametrize("chunk", [None, 1, 2, 4])  # tasks per backward (None: the default)
@pytest.mark.parametrize("batch", [3, 64])  # the δ path and the parameter path
def test_layerwise_gramian_equals_the_jacobian_gramian(batch: int, chunk: int | None) -> None:
    model = _mlp()
    engine = LayerwiseGramian.attach(model, active=lambda: True, owner="test")
    assert engine is not None
    engine.task_chunk = chunk
    g = torch.Generator().manual_seed(2)
    losses, present = _losses(
        model, torch.randn(batch, 6, generator=g), _labels(batch, g, missing=True)
    )
    kept = losses[present]
    shared = model.shared_parameters()
    blocks = task_jacobian(kept, shared, retain_graph=True)
    expected = gramian(flatten_jacobian(blocks, shared, kept.numel()))
    step = engine.step(kept, 1.0, shared, owner="test")
    assert step is not None and engine.failed is None
    assert step.gramian.shape == (3, 3)
    assert torch.allclose(
        step.gramian, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
    )


def test_layerwise_gramian_with_3d_inputs_and_a_layer_called_twice() -> None:
    torch.manual_seed(0)
    model = _Reused(TASKS)
    engine = LayerwiseGramian.attach(model, active=lambda: True, owner="test")
    assert engine is not None
    out = model(torch.randn(5, 6))
    losses = torch.stack([out[n].pow(2).mean() for n in ("r", "c", "b")])
    shared = model.shared_parameters()
    expected = gramian(
        flatten_jacobian(task_jacobian(losses, shared, retain_graph=True), shared, 3)
    )
    step = engine.step(losses, 1.0, shared, owner="test")
    assert step is not None
    assert torch.allclose(step.gramian, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_autogram_updates_equal_the_jacobian_path(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    w_ref, g_ref, _ = _train(method, False, steps=3)

    def no_jacobian(*args: object, **kwargs: object) -> None:
        raise AssertionError("the batched Jacobian path was taken")

    monkeypatch.setattr(sources_module, "unscaled_jacobian", no_jacobian)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        w, g, balancer = _train(method, True, steps=3)
    assert balancer.gramian_source.ready
    for a, b in zip(w, w_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref, strict=True):
        _assert_same(a, b)


def test_grad_scale_multiplies_the_gradients_only() -> None:
    w1, g1, _ = _train("upgrad", True)
    w8, g8, _ = _train("upgrad", True, scale=1024.0)
    w_ref, g_ref, _ = _train("upgrad", False, scale=1024.0)
    for a, b, c in zip(w8, w1, w_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-5) and torch.allclose(a, c, rtol=1e-5)
    for a, b, c in zip(g8, g1, g_ref, strict=True):
        _assert_same(a, {n: 1024.0 * t for n, t in b.items()})
        _assert_same(a, c)


def test_update_every_reuses_weights_as_the_jacobian_path(monkeypatch: pytest.MonkeyPatch) -> None:
    params = {"update_every": 3, "max_norm": 0.0}
    w_ref, g_ref, _ = _train("nash_mtl", False, steps=5, params=params)

    def no_jacobian(*args: object, **kwargs: object) -> None:
        raise AssertionError("the batched Jacobian path was taken")

    monkeypatch.setattr(sources_module, "unscaled_jacobian", no_jacobian)  # recompute steps 0 and 3
    w, g, balancer = _train("nash_mtl", True, steps=5, params=params)
    assert balancer.gramian_source.ready
    for a, b in zip(w, w_ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        _assert_same(a, b)


def test_state_dict_is_unchanged() -> None:
    _, _, balancer = _train("nash_mtl", True)
    plain = BALANCERS.get("nash_mtl")(TASKS)
    assert balancer.state_dict().keys() == plain.state_dict().keys()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        TASKS, (1, 6, 6), encoder="cnn", encoder_params={"channels": [4], "out_features": 8}
    )


@pytest.mark.parametrize(
    ("make_model", "shape"), [(_cnn, (1, 6, 6)), (lambda: _mlp(batch_norm=True), (6,))]
)
def test_convolutions_and_batch_norm_take_the_layerwise_path(
    make_model, shape, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conv2d and BatchNorm (training mode: samples coupled through the batch statistics) take
    the parameter path: no fallback warning, the same updates, no batched Jacobian after the
    first step's cross-check."""
    _, g_ref, _ = _train("mgda", False, make_model=make_model, input_shape=shape, steps=3)
    calls = []
    original = sources_module.unscaled_jacobian

    def counted(*args: object, **kwargs: object) -> Tensor:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sources_module, "unscaled_jacobian", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, g, balancer = _train("mgda", True, make_model=make_model, input_shape=shape, steps=3)
    assert balancer.gramian_source.ready and not calls
    for a, b in zip(g, g_ref, strict=True):
        _assert_same(a, b, overall=True)


class _Tricky(nn.Module):
    """Shared linear layers whose activations the hooks cannot trust."""

    def __init__(self, tasks: list[TaskSpec], mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.enc = nn.Linear(6, 8)
        self.heads = nn.ModuleDict({t.name: nn.Linear(8, t.output_dim) for t in tasks})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if self.mode == "inplace":
            h = self.enc(x).relu_()  # overwrites the captured output
        else:  # the shared weight also used outside its module's forward
            h = torch.tanh(self.enc(x)) + 0.5 * F.linear(x, self.enc.weight)
        return {n: head(h) for n, head in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.enc.parameters())


@pytest.mark.parametrize("mode", ["inplace", "functional"])
def test_untrustworthy_activations_fall_back_for_good(mode: str) -> None:
    def run(autogram: bool) -> tuple[list[dict[str, Tensor]], object]:
        torch.manual_seed(0)
        model = _Tricky(TASKS[:3], mode)
        balancer = BALANCERS.get("upgrad")(TASKS[:3])
        balancer.use_autogram = autogram
        balancer.attach(model)
        g = torch.Generator().manual_seed(3)
        grads = []
        for _ in range(3):
            out = model(torch.randn(7, 6, generator=g))
            losses = torch.stack([out[n].pow(2).mean() + out[n].mean() for n in ("r", "c", "b")])
            model.zero_grad(set_to_none=True)
            balancer.backward(losses, shared_params=model.shared_parameters())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        return grads, balancer

    ref, _ = run(False)
    with pytest.warns(UserWarning, match="autogram") as record:
        got, balancer = run(True)
    assert len([r for r in record if "autogram" in str(r.message)]) == 1
    assert balancer.gramian_source.hooks.failed is not None
    for a, b in zip(got, ref, strict=True):
        _assert_same(a, b)


def test_a_deep_copied_model_leaves_the_original_hooks_alone() -> None:
    model = _mlp()
    balancer = BALANCERS.get("dualproj")(TASKS)
    balancer.attach(model)
    model(torch.randn(4, 6))  # the hooks hold this forward's activations
    engine = balancer.gramian_source.hooks
    held = [[y for _, y, _, _ in layer.calls] for layer in engine.layers]
    assert all(len(calls) == 1 for calls in held)
    twin = copy.deepcopy(model)  # copies no captured (non-leaf) tensor
    twin(torch.randn(4, 6))  # the copied hooks ignore the copy's modules
    after = [[id(y) for _, y, _, _ in layer.calls] for layer in engine.layers]
    assert after == [[id(y) for y in calls] for calls in held]


class _Embedded(nn.Module):
    """Token embeddings with a padding row, mean-pooled, a linear layer; linear heads."""

    def __init__(self, tasks: list[TaskSpec], vocab: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, 5, padding_idx=0)
        self.mix = nn.Linear(5, 6)
        self.heads = nn.ModuleDict({t.name: nn.Linear(6, t.output_dim) for t in tasks})

    def forward(self, ids: Tensor) -> dict[str, Tensor]:
        h = torch.tanh(self.mix(self.tokens(ids).mean(1)))
        return {n: head(h) for n, head in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.tokens.parameters(), *self.mix.parameters()]


@pytest.mark.parametrize("vocab", [200, 7])  # fewer rows than the vocabulary: the δ path
def test_embeddings_with_a_padding_row_on_both_paths(vocab: int) -> None:
    torch.manual_seed(0)
    model = _Embedded(TASKS[:3], vocab).double()
    engine = LayerwiseGramian.attach(model, active=lambda: True, owner="test")
    assert engine is not None
    ids = torch.randint(0, vocab, (4, 6), generator=torch.Generator().manual_seed(4))
    ids[:, -2:] = 0  # padding: its row gets no gradient
    out = model(ids)
    losses = torch.stack([out[n].pow(2).mean() + out[n].mean() for n in ("r", "c", "b")])
    shared = model.shared_parameters()
    jacobian = flatten_jacobian(task_jacobian(losses, shared, retain_graph=True), shared, 3)
    step = engine.step(losses, 1.0, shared, owner="test")
    assert step is not None
    kinds = {type(b).__name__ for b in step.blocks}
    assert kinds == ({"_DeltaBlock"} if vocab == 200 else {"_DeltaBlock", "_ParamBlock"})
    expected = jacobian @ jacobian.T
    assert torch.allclose(step.gramian, expected, rtol=1e-10, atol=1e-12)
    weights = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    step.apply(weights)
    update = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(update, weights @ jacobian, rtol=1e-10, atol=1e-12)
    assert float(model.tokens.weight.grad[0].abs().max()) == 0.0


class _Zoo(nn.Module):
    """One of each layer kind the parameter path must cover, with linear heads."""

    def __init__(self, tasks: list[TaskSpec]) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(20, 6, mode="mean")
        self.conv = nn.Conv1d(6, 8, 3, stride=2, padding=2, dilation=2, groups=2)
        self.group_norm = nn.GroupNorm(2, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.layer_norm = nn.LayerNorm(8)
        self.rms_norm = nn.RMSNorm(8)
        self.scale = nn.Parameter(torch.ones(8))  # a free parameter
        self.heads = nn.ModuleDict({t.name: nn.Linear(8, t.output_dim) for t in tasks})

    def forward(self, ids: Tensor) -> dict[str, Tensor]:
        b = ids.shape[0]
        h = self.bag(ids.reshape(-1, 3)).reshape(b, -1, 6)  # [B, 5, 6]
        h = torch.tanh(self.group_norm(self.conv(h.transpose(1, 2)))).transpose(1, 2)
        a, _ = self.attention(h, h, h)
        h = self.rms_norm(self.layer_norm(h + a)) * self.scale
        return {n: head(h.mean(1)) for n, head in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("heads.")]


def test_every_layer_kind_on_the_parameter_path_equals_the_jacobian() -> None:
    torch.manual_seed(0)
    model = _Zoo(TASKS[:3]).double()
    engine = LayerwiseGramian.attach(model, active=lambda: True, owner="test")
    assert engine is not None and not engine.layers  # no linear layer is shared here
    ids = torch.randint(0, 20, (4, 15), generator=torch.Generator().manual_seed(5))
    out = model(ids)
    losses = torch.stack([out[n].pow(2).mean() + out[n].mean() for n in ("r", "c", "b")])
    shared = model.shared_parameters()
    jacobian = flatten_jacobian(task_jacobian(losses, shared, retain_graph=True), shared, 3)
    step = engine.step(losses, 1.0, shared, owner="test")
    assert step is not None and engine.failed is None
    assert torch.allclose(step.gramian, jacobian @ jacobian.T, rtol=1e-10, atol=1e-12)
    weights = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    step.apply(weights)
    update = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(update, weights @ jacobian, rtol=1e-10, atol=1e-12)


class _Wide(nn.Module):
    """One large free parameter: float32 inner products over 2M same-signed terms."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2_000_000))

    def shared_parameters(self) -> list[nn.Parameter]:
        return [self.w]


def test_large_layers_are_accumulated_in_float64() -> None:
    model = _Wide()
    engine = LayerwiseGramian.attach(model, active=lambda: True, owner="test")
    assert engine is not None
    g = torch.Generator().manual_seed(6)
    a = torch.rand(3, 2_000_000, generator=g) + 0.5  # J = a: every product positive
    losses = (a * model.w).sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first-step cross-check must not fail either
        step = engine.step(losses, 1.0, model.shared_parameters(), owner="test")
    assert step is not None
    exact = a.double() @ a.double().T
    assert float(((step.gramian.double() - exact) / exact).abs().max()) < 1e-6
