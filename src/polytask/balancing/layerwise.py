"""The Gramian of the task gradients, layer by layer, without the K×P Jacobian ("autogram").

For a linear layer ``y = x Wᵀ + b`` seen by ``N`` rows (the batch, every leading dimension and
every call of the layer in the forward, concatenated), task ``k``'s gradient of ``W`` is
``δ_kᵀ x`` where ``δ_k = ∂L_k/∂y`` is ``[N, out]``. So the Gramian of the task gradients of all
shared parameters is

    ``G_kl = Σ_layers Σ_{n,n'} (x_n·x_n')(δ_k,n·δ_l,n')  +  (Σ_n δ_k,n)·(Σ_n' δ_l,n')``

(the second term for the bias), and the update ``Σ_k w_k ∇L_k`` of the layer is
``(Σ_k w_k δ_k)ᵀ x``. This needs the activations (kept by forward hooks) and the per-task
output gradients ``δ`` (ONE backward batched over the K tasks, with respect to the layers'
outputs only: no per-task weight gradient is ever formed), as torchjd's autogram engine does.
Per layer, the contraction picks the cheaper of (with ``A = x xᵀ``, ``N × N``)

- *Gram*: ``G += Σ_k δ_k·(A δ_l)``, about ``N²·in + K·N²·out + K²·N·out`` multiply-adds
  (computed one task at a time, so the temporary is ``N × out``), and
- *Jacobian*: the layer's per-task gradients ``δ_kᵀ x`` (``K × out × in``), then their inner
  products, about ``K·N·out·in + K²·out·in``: cheaper when the batch exceeds the layer's width.

``LayerwiseGramian.attach`` decides once whether a model can take this path: every shared
parameter must belong to an ``nn.Linear`` (used through its ``forward``) that owns no other
trainable parameter outside the shared set and shares none with another module. Anything else
(convolutions, BatchNorm, embeddings, LayerNorm, free parameters) keeps the batched Jacobian
path, and the reason is given once as a warning. On the first step the Gramian is also checked
against the batched Jacobian's (catching a weight used outside its module, or an in-place
operation on a layer's output); on a mismatch the aggregator falls back for good.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from polytask.balancing.jacobian import gramian, unscaled_jacobian


@dataclass
class _Layer:
    """One shared linear layer and what the latest forward showed of it."""

    name: str
    module: nn.Linear
    weight: bool  # whether the weight is shared (differentiated)
    bias: bool  # whether the bias is shared
    calls: list[tuple[Tensor, Tensor, int, int]]  # (input, output, versions of both)


def shared_linear_layers(
    model: nn.Module, shared: Sequence[Tensor]
) -> tuple[list[_Layer], str | None]:
    """The ``nn.Linear`` layers holding the ``shared`` parameters, or the reason (naming the
    first module or parameter) why the layer-wise Gramian cannot be used for this model."""
    shared_ids = {id(p) for p in shared}
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=True):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, module))
    layers: dict[int, _Layer] = {}
    for p in shared:
        found = owners.get(id(p), [])
        if not found:
            return [], "a shared parameter belongs to no module of the model"
        if len(found) > 1:
            return [], f"a shared parameter is held by several modules ({found[0][0]!r}, ...)"
        name, module = found[0]
        label = f"{name or 'model'} ({type(module).__name__})"
        if type(module) is not nn.Linear:
            return [], f"shared module {label} is not an nn.Linear"
        assert isinstance(module, nn.Linear)
        for own in module.parameters(recurse=False):
            if own.requires_grad and id(own) not in shared_ids:
                return [], f"{label} has trainable parameters outside the shared set"
        if id(module) not in layers:
            layers[id(module)] = _Layer(
                name,
                module,
                weight=id(module.weight) in shared_ids,
                bias=module.bias is not None and id(module.bias) in shared_ids,
                calls=[],
            )
    return list(layers.values()), None


@dataclass
class LayerwiseStep:
    """The Gramian of one step (unscaled, float32/64) and what applying weights needs."""

    gramian: Tensor
    inputs: list[Tensor]  # per layer: the inputs ``[N, in]``
    deltas: list[Tensor | None]  # per layer: the scaled output gradients ``[K, N, out]``
    layers: list[_Layer]

    def apply(self, weights: Tensor) -> None:
        """Add ``Σ_k w_k ∇L_k`` (times the grad scale already in ``δ``) to the shared
        parameters' ``.grad``: per layer ``(Σ_k w_k δ_k)ᵀ x``; zeros where a layer did not
        contribute, as the Jacobian path writes them."""
        for i, (layer, x, delta) in enumerate(
            zip(self.layers, self.inputs, self.deltas, strict=True)
        ):
            self.deltas[i] = None  # freed layer by layer: the peak stays near the δ's alone
            m = layer.module
            grads: list[tuple[Tensor, Tensor | None]] = []
            if delta is None:
                if layer.weight:
                    grads.append((m.weight, None))
                if layer.bias:
                    grads.append((m.bias, None))
            else:
                wd = weights.to(self.gramian.dtype) @ delta.flatten(1).to(self.gramian.dtype)
                wd = wd.view(delta.shape[1], delta.shape[2])  # [N, out]
                if layer.weight:
                    grads.append((m.weight, wd.T @ x.to(wd.dtype)))
                if layer.bias:
                    grads.append((m.bias, wd.sum(0)))
                del wd, delta
            for p, g in grads:
                g = torch.zeros_like(p) if g is None else g.to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)


class LayerwiseGramian:
    """Forward hooks on a model's shared linear layers and the layer-wise Gramian they allow.

    Build it with ``LayerwiseGramian.attach(model, active=...)`` (``None`` when the model is not
    eligible); ``step(losses, scale)`` returns the Gramian of the latest forward's task
    gradients, or ``None`` (with one warning, after which it stays off) when the captured
    activations cannot be trusted; ``remove()`` takes the hooks off.
    """

    def __init__(self, model: nn.Module, layers: list[_Layer], active: Callable[[], bool]) -> None:
        self.layers = layers
        self.active = active
        self.verified = False
        self.failed: str | None = None
        self._param_ids = {
            id(p)
            for layer in layers
            for p, on in ((layer.module.weight, layer.weight), (layer.module.bias, layer.bias))
            if on
        }
        # plain closures, not bound methods: ``copy.deepcopy(model)`` then shares them instead of
        # copying this object (and its captured tensors); they ignore modules other than ours
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._reset(model))]
        for layer in layers:
            self._handles.append(layer.module.register_forward_hook(self._capture(layer)))

    @classmethod
    def attach(
        cls, model: nn.Module, *, active: Callable[[], bool], owner: str
    ) -> LayerwiseGramian | None:
        """Hooks on ``model``'s shared linear layers, or ``None`` with one warning saying why
        the model keeps the batched Jacobian path."""
        shared_fn = getattr(model, "shared_parameters", None)
        if shared_fn is None:
            return None  # no notion of shared parameters: the caller passes them each step
        shared = [p for p in shared_fn() if p.requires_grad]
        layers, reason = shared_linear_layers(model, shared) if shared else ([], "none shared")
        if reason is not None or not layers:
            warnings.warn(
                f"{owner}: the layer-wise Gramian (autogram) is off for this model: {reason}; "
                "using the batched per-task Jacobian (slower, K× memory)",
                stacklevel=3,
            )
            return None
        return cls(model, layers, active)

    # ------------------------------------------------------------------ hooks
    def _reset(self, model: nn.Module) -> Callable[[nn.Module, object], None]:
        def hook(module: nn.Module, args: object) -> None:
            if module is model and torch.is_grad_enabled():
                self.clear()  # a new forward: forget the previous one's activations

        return hook

    def _capture(self, layer: _Layer) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if module is not layer.module or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor) or not output.requires_grad or not self.usable():
                return
            x = args[0].detach()
            layer.calls.append((x, output, x._version, output._version))

        return hook

    def usable(self) -> bool:
        """Whether the layer-wise path is on (not failed, and the owner wants it now)."""
        return self.failed is None and self.active()

    def clear(self) -> None:
        """Forget the captured activations."""
        for layer in self.layers:
            layer.calls.clear()

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def _fail(self, reason: str, owner: str) -> None:
        self.failed = reason
        self.clear()
        warnings.warn(
            f"{owner}: the layer-wise Gramian (autogram) is off from now on: {reason}; using the "
            "batched per-task Jacobian (slower, K× memory)",
            stacklevel=4,
        )

    # ------------------------------------------------------------------ the Gramian
    def step(
        self,
        losses: Tensor,
        scale: Tensor | float,
        shared: Sequence[Tensor],
        *,
        owner: str,
    ) -> LayerwiseStep | None:
        """The Gramian of the task gradients of ``losses`` (``[K]``, already multiplied by
        ``scale``), divided by ``scale²``; ``None`` when the Jacobian path must be used."""
        reason = self._untrusted(shared)
        if reason is not None:
            self._fail(reason, owner)
            return None
        verify = not self.verified
        try:
            inputs, deltas = self._output_gradients(losses, retain_graph=verify)
        except RuntimeError as exc:
            if not verify:
                raise
            self._fail(f"the batched backward failed ({str(exc).splitlines()[0]})", owner)
            return None
        k = losses.numel()
        dtype = torch.float64 if losses.dtype == torch.float64 else torch.float32
        g = torch.zeros(k, k, dtype=dtype, device=losses.device)
        for layer, x, delta in zip(self.layers, inputs, deltas, strict=True):
            if delta is not None:
                g += _layer_gramian(x, delta, weight=layer.weight, bias=layer.bias, dtype=dtype)
        g = (g + g.T) / 2
        if not (isinstance(scale, float) and scale == 1.0):
            g = g / (scale * scale)
        if verify:
            self.verified = True
            if not self._matches_the_jacobian(g, losses, scale, shared, deltas):
                self._fail(
                    "its Gramian differs from the batched Jacobian's (a shared weight used "
                    "outside its module's forward?)",
                    owner,
                )
                return None
        return LayerwiseStep(g, inputs, deltas, self.layers)

    def _untrusted(self, shared: Sequence[Tensor]) -> str | None:
        """Why the captured activations cannot be used for ``shared`` (``None``: they can)."""
        if {id(p) for p in shared} != self._param_ids:
            return "the shared parameters given differ from the model's"
        calls = [(layer, call) for layer in self.layers for call in layer.calls]
        if not calls:
            return "no shared linear layer was seen in the forward"
        for layer, (x, y, vx, vy) in calls:
            if x._version != vx or y._version != vy:
                return f"an in-place operation changed the input or output of {layer.name!r}"
        return None

    def _output_gradients(
        self, losses: Tensor, *, retain_graph: bool
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Per layer, its inputs ``[N, in]`` and the task gradients of its outputs
        ``[K, N, out]`` (``None`` where no loss depends on it), every call of the layer
        concatenated along ``N``: ONE backward batched over the K tasks."""
        k = losses.numel()
        outputs = [y for layer in self.layers for _, y, _, _ in layer.calls]
        eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
            grads = torch.autograd.grad(
                losses,
                outputs,
                grad_outputs=eye,
                is_grads_batched=True,
                retain_graph=retain_graph,
                allow_unused=True,
            )
        inputs: list[Tensor] = []
        deltas: list[Tensor | None] = []
        index = 0
        for layer in self.layers:
            xs, ds = [], []
            for x, y, _, _ in layer.calls:
                g = grads[index]
                index += 1
                if g is not None:
                    xs.append(x.reshape(-1, x.shape[-1]))
                    ds.append(g.reshape(k, -1, y.shape[-1]))
            if ds:
                inputs.append(xs[0] if len(xs) == 1 else torch.cat(xs))
                deltas.append(ds[0] if len(ds) == 1 else torch.cat(ds, dim=1))
            else:
                inputs.append(losses.new_zeros(0, layer.module.in_features))
                deltas.append(None)
        del grads, outputs
        self.clear()
        return inputs, deltas

    @staticmethod
    def _matches_the_jacobian(
        g: Tensor,
        losses: Tensor,
        scale: Tensor | float,
        shared: Sequence[Tensor],
        deltas: Sequence[Tensor | None],
    ) -> bool:
        """Whether ``g`` equals the batched Jacobian's Gramian (checked on the first step)."""
        reference = gramian(
            unscaled_jacobian(losses, shared, scale, dtype=g.dtype, retain_graph=True)
        )
        # fp16/bf16 weight gradients (autocast) round the reference itself
        low = any(d is not None and d.dtype not in (torch.float32, torch.float64) for d in deltas)
        rtol = 3e-2 if low else 1e-3
        tol = rtol * float(reference.abs().max()) + 1e-12
        return torch.allclose(g, reference, rtol=rtol, atol=tol)


def _layer_gramian(
    x: Tensor, delta: Tensor, *, weight: bool, bias: bool, dtype: torch.dtype
) -> Tensor:
    """One linear layer's contribution to the Gramian: ``x`` ``[N, in]``, ``delta``
    ``[K, N, out]`` (see the module docstring for the two contractions)."""
    k, n, out = delta.shape
    d = delta.to(dtype)
    g = d.new_zeros(k, k)
    if weight:
        xf = x.to(dtype)
        width = xf.shape[1]
        gram_cost = n * n * width + k * n * n * out + k * k * n * out
        jacobian_cost = k * n * out * width + k * k * out * width
        if gram_cost <= jacobian_cost:
            a = xf @ xf.T  # [N, N]
            flat = d.reshape(k, -1)
            for i in range(k):  # one task at a time: the temporary is [N, out]
                g[i] = flat @ (a @ d[i]).reshape(-1)
        else:
            jac = (d.transpose(1, 2) @ xf).reshape(k, -1)  # [K, out·in]
            g += jac @ jac.T
    if bias:
        s = d.sum(1)  # [K, out]
        g += s @ s.T
    return g
