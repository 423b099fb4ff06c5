"""The Gramian of the task gradients, layer by layer, without the K×P Jacobian ("autogram").

For a linear layer ``y = x Wᵀ + b`` seen by ``N`` rows (the batch, every leading dimension and
every call of the layer in the forward, concatenated), task ``k``'s gradient of ``W`` is
``δ_kᵀ x`` where ``δ_k = ∂L_k/∂y`` is ``[N, out]``. So the Gramian of the task gradients of all
shared parameters is

    ``G_kl = Σ_layers Σ_{n,n'} (x_n·x_n')(δ_k,n·δ_l,n')  +  (Σ_n δ_k,n)·(Σ_n' δ_l,n')``

(the second term for the bias), and the update ``Σ_k w_k ∇L_k`` of the layer is
``(Σ_k w_k δ_k)ᵀ x``. This needs the activations (kept by forward hooks) and the per-task
output gradients ``δ``, as torchjd's autogram engine does.

An embedding is a linear layer on one-hot inputs: ``x_n·x_n' = [i_n = i_n']``, and its update
adds ``Σ_k w_k δ_k`` into the rows it looked up (none into ``padding_idx``).

Every other shared parameter (convolutions of any stride, padding, dilation and groups,
embedding bags, LayerNorm/GroupNorm/RMSNorm/BatchNorm affine parameters,
``nn.MultiheadAttention``'s projections, cross-stitch units, MTAN attention, expert gates, free
``nn.Parameter`` s) takes the *parameter path*: its per-task gradient ``[K, *shape]`` comes out
of the same backward. So the backward over the K tasks asks, per layer, for either

- *δ path* (an ``nn.Linear`` called through its ``forward``, or an ``nn.Embedding``, when
  ``N·out`` is at most the layer's parameter count: the δ are smaller than the layer's per-task
  gradient): the gradients of its outputs ``[K, N, out]``; no per-task weight gradient is ever
  formed. The Gramian term is then contracted the cheaper of two ways (with ``A = x xᵀ``,
  ``N × N``): *Gram*, ``G += Σ_k δ_k·(A δ_l)``, about ``N²·in + K·N²·out + K²·N·out``
  multiply-adds (one task at a time, so the temporary is ``N × out``), or *Jacobian*, ``δ_kᵀ x``
  then inner products, about ``K·N·out·in + K²·out·in``; or
- *parameter path* (everything else, and layers whose rows outnumber their inputs, as a
  transformer's token-wise projections or a vocabulary smaller than the batch's tokens): the
  per-task gradient of its parameters ``[K, size]``; the Gramian term is ``J_l J_lᵀ`` and the
  update ``wᵀ J_l``. This is exact for any module, BatchNorm in training mode included: the
  coupling of the samples through the batch statistics is in the backward that produces it.

The backward runs ``chunk_size`` tasks at a time (``task_gradients``): on the CPU one task per
plain backward with the graph retained (as fast as ``is_grads_batched`` there, faster for
convolutions and attention, and the backward's temporaries are one task's instead of K), on a
GPU all K batched (``is_grads_batched``); ``LayerwiseGramian.task_chunk`` overrides it.

The choice is made per layer from the shapes of the step and logged (``logging.DEBUG``, logger
``polytask.balancing.layerwise``) the first time and whenever it changes. Each layer's buffers
(``δ`` and its inputs, or ``J_l``) are freed as soon as ``LayerwiseStep.apply`` has written its
update. On the first step the Gramian is also checked against the batched Jacobian's (catching a
linear layer's weight used outside its ``forward``, or an in-place operation on a layer's
output); on a mismatch the aggregator falls back to the batched Jacobian for good.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from polytask.balancing.jacobian import gramian, unscaled_jacobian

LOG = logging.getLogger(__name__)


@dataclass
class _Layer:
    """One shared linear layer (or embedding: a linear layer on one-hot inputs) and what the
    latest forward showed of it."""

    name: str
    module: nn.Linear | nn.Embedding
    weight: bool  # whether the weight is shared (differentiated)
    bias: bool  # whether the bias is shared
    calls: list[tuple[Tensor, Tensor, int, int]]  # (input, output, versions of both)

    def parameters(self) -> list[Tensor]:
        """The layer's shared parameters."""
        m = self.module
        bias = m.bias if isinstance(m, nn.Linear) else None
        return [p for p, on in ((m.weight, self.weight), (bias, self.bias)) if on and p is not None]

    @property
    def width(self) -> int:
        """The width of the layer's output (``out``)."""
        m = self.module
        return m.out_features if isinstance(m, nn.Linear) else m.embedding_dim


@dataclass
class _Direct:
    """Shared parameters on the parameter path, grouped by the module that holds them."""

    name: str  # the module's name and type, for the log
    params: list[Tensor]


def _delta_eligible(module: nn.Module, inside_attention: set[int]) -> bool:
    """Whether ``module`` may take the δ path: an ``nn.Linear`` computing its output with its
    ``forward`` (``nn.MultiheadAttention`` reads its ``out_proj`` weight directly), or an
    ``nn.Embedding`` with dense, unscaled gradients."""
    if type(module) is nn.Embedding:
        return not module.scale_grad_by_freq and not module.sparse
    return type(module) is nn.Linear and id(module) not in inside_attention


def shared_layers(model: nn.Module, shared: Sequence[Tensor]) -> tuple[list[_Layer], list[_Direct]]:
    """The ``shared`` parameters split into linear layers (δ path where cheaper) and the rest
    (parameter path), grouped by the module holding them (``"free"`` for a parameter held by no
    module or by several)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    inside_attention: set[int] = set()
    for name, module in model.named_modules(remove_duplicate=True):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, module))
        if isinstance(module, nn.MultiheadAttention):
            inside_attention.update(id(m) for m in module.modules() if m is not module)
    shared_ids = {id(p) for p in shared}
    layers: dict[int, _Layer] = {}
    direct: dict[str, _Direct] = {}
    for p in shared:
        found = owners.get(id(p), [])
        if len(found) == 1 and _delta_eligible(found[0][1], inside_attention):
            name, module = found[0]
            assert isinstance(module, nn.Linear | nn.Embedding)
            bias = module.bias if isinstance(module, nn.Linear) else None
            if id(module) not in layers:
                layers[id(module)] = _Layer(
                    name,
                    module,
                    weight=id(module.weight) in shared_ids,
                    bias=bias is not None and id(bias) in shared_ids,
                    calls=[],
                )
            continue
        label = (
            "free"
            if len(found) != 1
            else f"{found[0][0] or 'model'} ({type(found[0][1]).__name__})"
        )
        direct.setdefault(label, _Direct(label, [])).params.append(p)
    return list(layers.values()), list(direct.values())


@dataclass
class _DeltaBlock:
    """A layer on the δ path: its inputs (``[N, in]``; an embedding's indices ``[N]``) and
    output gradients ``[K, N, out]``."""

    layer: _Layer
    inputs: Tensor
    delta: Tensor | None

    def gramian(self, dtype: torch.dtype) -> Tensor | None:
        if self.delta is None:
            return None
        if isinstance(self.layer.module, nn.Embedding):  # one-hot inputs: x_n·x_n' = [i_n = i_n']
            same = (self.inputs[:, None] == self.inputs[None, :]).to(dtype)
            return _gram_contraction(same, self.delta.to(dtype))
        return _layer_gramian(
            self.inputs, self.delta, weight=self.layer.weight, bias=self.layer.bias, dtype=dtype
        )

    def grads(self, weights: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        m, delta = self.layer.module, self.delta
        self.delta = None  # freed layer by layer
        if delta is None:
            return [(p, None) for p in self.layer.parameters()]
        wd = weights @ delta.flatten(1).to(weights.dtype)
        wd = wd.view(delta.shape[1], delta.shape[2])  # [N, out]
        del delta
        grads: list[tuple[Tensor, Tensor | None]] = []
        if isinstance(m, nn.Embedding):  # the rows used, each the sum of its samples' δ
            zeros = m.weight.new_zeros(m.weight.shape, dtype=wd.dtype)
            return [(m.weight, zeros.index_add_(0, self.inputs, wd))]
        if self.layer.weight:
            grads.append((m.weight, wd.T @ self.inputs.to(wd.dtype)))
        if self.layer.bias:
            grads.append((m.bias, wd.sum(0)))
        return grads


@dataclass
class _ParamBlock:
    """Parameters on the parameter path and their per-task gradients ``[K, *shape]``."""

    params: list[Tensor]
    jacobians: list[Tensor | None]

    def gramian(self, dtype: torch.dtype) -> Tensor | None:
        # summed in float64 (float32 on MPS): a float32 inner product over a large layer's
        # hundreds of thousands of same-signed squares loses up to 1% (seen on a ResNet)
        g = None
        for j in self.jacobians:
            if j is not None:
                flat = j.reshape(j.shape[0], -1).to(_wide(j.device))
                term = flat @ flat.T
                g = term if g is None else g + term
        return None if g is None else g.to(dtype)

    def grads(self, weights: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        jacobians, self.jacobians = self.jacobians, []  # freed layer by layer
        out: list[tuple[Tensor, Tensor | None]] = []
        for p, j in zip(self.params, jacobians, strict=True):
            update = None if j is None else (weights @ j.reshape(j.shape[0], -1).to(weights.dtype))
            out.append((p, None if update is None else update.view_as(p)))
        return out


@dataclass
class LayerwiseStep:
    """The Gramian of one step (unscaled, float32/64) and what applying weights needs."""

    gramian: Tensor
    blocks: list[_DeltaBlock | _ParamBlock]

    def apply(self, weights: Tensor) -> None:
        """Add ``Σ_k w_k ∇L_k`` (times the grad scale already in ``δ`` and ``J_l``) to the shared
        parameters' ``.grad``, one layer at a time (each layer's buffers are freed as soon as
        its update is written); zeros where a layer did not contribute, as the Jacobian path
        writes them."""
        w = weights.to(self.gramian.dtype)
        blocks, self.blocks = self.blocks, []
        for block in blocks:
            for p, g in block.grads(w):
                g = torch.zeros_like(p) if g is None else g.to(p.dtype)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        del blocks


class LayerwiseGramian:
    """Forward hooks on a model's shared linear layers and the layer-wise Gramian they allow.

    Build it with ``LayerwiseGramian.attach(model, active=...)`` (``None`` when the model has no
    shared parameters); ``step(losses, scale)`` returns the Gramian of the latest forward's task
    gradients, or ``None`` (with one warning, after which it stays off) when the captured
    activations cannot be trusted; ``remove()`` takes the hooks off.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[_Layer],
        active: Callable[[], bool],
        direct: Sequence[_Direct] = (),
    ) -> None:
        self.layers = layers
        self.direct = list(direct)
        self.active = active
        self.verified = False
        self.failed: str | None = None
        self._param_ids = {id(p) for layer in layers for p in layer.parameters()}
        self._param_ids.update(id(p) for group in self.direct for p in group.params)
        self._logged: dict[str, str] = {}
        #: tasks per backward (``None``: 1 on the CPU, all K elsewhere; see ``chunk_size``)
        self.task_chunk: int | None = None
        # plain closures, not bound methods: ``copy.deepcopy(model)`` then shares them instead of
        # copying this object (and its captured tensors); they ignore modules other than ours
        self._handles: list[RemovableHandle] = [model.register_forward_pre_hook(self._reset(model))]
        for layer in layers:
            self._handles.append(layer.module.register_forward_hook(self._capture(layer)))

    @classmethod
    def attach(
        cls, model: nn.Module, *, active: Callable[[], bool], owner: str
    ) -> LayerwiseGramian | None:
        """Hooks on ``model``'s shared linear layers (every other shared parameter takes the
        parameter path), or ``None`` with one warning when the model shares no parameter."""
        shared_fn = getattr(model, "shared_parameters", None)
        if shared_fn is None:
            return None  # no notion of shared parameters: the caller passes them each step
        shared = [p for p in shared_fn() if p.requires_grad]
        if not shared:
            warnings.warn(
                f"{owner}: the layer-wise Gramian (autogram) is off for this model: none of its "
                "parameters is shared and trainable",
                stacklevel=3,
            )
            return None
        layers, direct = shared_layers(model, shared)
        for group in direct:
            LOG.debug("%s: %s takes the parameter path", owner, group.name)
        return cls(model, layers, active, direct)

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
            blocks = self._task_gradients(losses, retain_graph=verify, owner=owner)
        except RuntimeError as exc:
            if not verify:
                raise
            self._fail(f"the batched backward failed ({str(exc).splitlines()[0]})", owner)
            return None
        k = losses.numel()
        dtype = torch.float64 if losses.dtype == torch.float64 else torch.float32
        g = torch.zeros(k, k, dtype=dtype, device=losses.device)
        for block in blocks:
            term = block.gramian(dtype)
            if term is not None:
                g += term
        g = (g + g.T) / 2
        if not (isinstance(scale, float) and scale == 1.0):
            g = g / (scale * scale)
        if verify:
            self.verified = True
            if not self._matches_the_jacobian(g, losses, scale, shared, blocks):
                self._fail(
                    "its Gramian differs from the batched Jacobian's (a shared weight used "
                    "outside its module's forward?)",
                    owner,
                )
                return None
        return LayerwiseStep(g, blocks)

    def _untrusted(self, shared: Sequence[Tensor]) -> str | None:
        """Why the captured activations cannot be used for ``shared`` (``None``: they can)."""
        if {id(p) for p in shared} != self._param_ids:
            return "the shared parameters given differ from the model's"
        for layer in self.layers:
            for x, y, vx, vy in layer.calls:
                if x._version != vx or y._version != vy:
                    return f"an in-place operation changed the input or output of {layer.name!r}"
        return None

    def _plan(self, owner: str) -> tuple[list[_Layer], list[_Direct]]:
        """The linear layers taking the δ path this step (seen in the forward, and their δ no
        larger than their per-task gradient) and the parameter groups taking the other."""
        delta: list[_Layer] = []
        direct = list(self.direct)
        for layer in self.layers:
            rows = sum(y.numel() // max(y.shape[-1], 1) for _, y, _, _ in layer.calls)
            size = sum(p.numel() for p in layer.parameters())
            cheaper = rows * layer.width <= size
            path = "delta" if layer.calls and cheaper else "parameters"
            if self._logged.get(layer.name) != path:
                self._logged[layer.name] = path
                LOG.debug(
                    "%s: linear layer %r takes the %s path (δ: K×%d×%d, per-task gradient: K×%d)",
                    owner,
                    layer.name,
                    path,
                    rows,
                    layer.width,
                    size,
                )
            if path == "delta":
                delta.append(layer)
            else:
                direct.append(_Direct(layer.name, layer.parameters()))
        return delta, direct

    def chunk_size(self, losses: Tensor) -> int:
        """How many tasks each backward differentiates at once: ``task_chunk`` if set, else 1 on
        the CPU (one task at a time: as fast as batching them there, or faster for convolutions
        and attention, and the backward's temporaries are one task's) and all K elsewhere (a GPU
        needs the batch to fill itself)."""
        if self.task_chunk is not None:
            return max(1, int(self.task_chunk))
        return 1 if losses.device.type == "cpu" else losses.numel()

    def _task_gradients(
        self, losses: Tensor, *, retain_graph: bool, owner: str
    ) -> list[_DeltaBlock | _ParamBlock]:
        """ONE backward batched over the K tasks: per δ-path layer its inputs ``[N, in]`` and
        the task gradients of its outputs ``[K, N, out]`` (every call concatenated along ``N``;
        ``None`` where no loss depends on it), per parameter-path group its per-task
        gradients."""
        k = losses.numel()
        delta_layers, direct = self._plan(owner)
        outputs = [y for layer in delta_layers for _, y, _, _ in layer.calls]
        params = [p for group in direct for p in group.params]
        grads = task_gradients(
            losses, [*outputs, *params], retain_graph=retain_graph, chunk=self.chunk_size(losses)
        )
        blocks: list[_DeltaBlock | _ParamBlock] = []
        index = 0
        for layer in delta_layers:
            xs, ds = [], []
            for x, y, _, _ in layer.calls:
                g = grads[index]
                grads[index] = None  # each δ freed once moved into its block
                index += 1
                if g is not None:
                    xs.append(_rows(layer.module, x))
                    ds.append(_masked(layer.module, x, g.reshape(k, -1, y.shape[-1])))
            x_all = xs[0] if len(xs) == 1 else losses.new_zeros(0) if not xs else torch.cat(xs)
            d_all = None if not ds else ds[0] if len(ds) == 1 else torch.cat(ds, dim=1)
            blocks.append(_DeltaBlock(layer, x_all, d_all))
        for group in direct:
            n = len(group.params)
            blocks.append(_ParamBlock(group.params, grads[index : index + n]))
            index += n
        del grads, outputs
        self.clear()
        return blocks

    @staticmethod
    def _matches_the_jacobian(
        g: Tensor,
        losses: Tensor,
        scale: Tensor | float,
        shared: Sequence[Tensor],
        blocks: Sequence[_DeltaBlock | _ParamBlock],
    ) -> bool:
        """Whether ``g`` equals the batched Jacobian's Gramian (checked on the first step)."""
        wide = _wide(g.device)  # a float32 J Jᵀ over millions of entries is itself off by ~1%
        reference = gramian(unscaled_jacobian(losses, shared, scale, dtype=wide, retain_graph=True))
        g = g.to(wide)
        # fp16/bf16 weight gradients (autocast) round the reference itself
        low = any(
            isinstance(b, _DeltaBlock)
            and b.delta is not None
            and b.delta.dtype not in (torch.float32, torch.float64)
            for b in blocks
        )
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
            g += _gram_contraction(xf @ xf.T, d)
        else:
            jac = (d.transpose(1, 2) @ xf).reshape(k, -1)  # [K, out·in]
            g += jac @ jac.T
    if bias:
        s = d.sum(1)  # [K, out]
        g += s @ s.T
    return g


def task_gradients(
    losses: Tensor, targets: Sequence[Tensor], *, retain_graph: bool, chunk: int
) -> list[Tensor | None]:
    """The gradients ``[K, *shape]`` of each of the K ``losses`` with respect to each target
    (``None`` where no loss depends on it), ``chunk`` tasks per backward: batched over them
    (``is_grads_batched``) when ``chunk > 1``, a plain backward per task when ``chunk == 1``.
    The backward's temporaries (the activations' gradients) scale with ``chunk``; the results are
    written into one ``[K, ...]`` buffer per target."""
    k = losses.numel()
    eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
    out: list[Tensor | None] = [None] * len(targets)
    for start in range(0, k, chunk):
        stop = min(k, start + chunk)
        keep = retain_graph or stop < k
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
            if stop - start == 1:
                grads: Sequence[Tensor | None] = torch.autograd.grad(
                    losses, targets, grad_outputs=eye[start], retain_graph=keep, allow_unused=True
                )
                grads = [None if g is None else g.unsqueeze(0) for g in grads]
            else:
                grads = torch.autograd.grad(
                    losses,
                    targets,
                    grad_outputs=eye[start:stop],
                    is_grads_batched=True,
                    retain_graph=keep,
                    allow_unused=True,
                )
        if start == 0 and stop == k:
            return list(grads)
        for i, g in enumerate(grads):
            if g is None:
                continue
            buffer = out[i]
            if buffer is None:
                buffer = out[i] = g.new_zeros((k, *g.shape[1:]))
            buffer[start:stop] = g
        del grads
    return out


def _gram_contraction(a: Tensor, d: Tensor) -> Tensor:
    """``G_kl = Σ_n,n' A_nn' (δ_k,n·δ_l,n')`` for ``A`` ``[N, N]`` and ``δ`` ``[K, N, out]``, one
    task at a time (the temporary is ``[N, out]``)."""
    k = d.shape[0]
    flat = d.reshape(k, -1)
    g = d.new_zeros(k, k)
    for i in range(k):
        g[i] = flat @ (a @ d[i]).reshape(-1)
    return g


def _rows(module: nn.Module, x: Tensor) -> Tensor:
    """A call's input as rows: ``[N, in]`` for a linear layer, the indices ``[N]`` for an
    embedding."""
    return x.reshape(-1) if isinstance(module, nn.Embedding) else x.reshape(-1, x.shape[-1])


def _masked(module: nn.Module, x: Tensor, delta: Tensor) -> Tensor:
    """``δ`` ``[K, N, out]`` with the rows of an embedding's ``padding_idx`` zeroed (they get no
    gradient)."""
    pad = module.padding_idx if isinstance(module, nn.Embedding) else None
    if pad is None:
        return delta
    return delta * (x.reshape(-1) != pad).to(delta.dtype)[None, :, None]


def _wide(device: torch.device) -> torch.dtype:
    """The dtype to accumulate Gramians in: float64, float32 on MPS (no float64 there)."""
    return torch.float32 if device.type == "mps" else torch.float64
