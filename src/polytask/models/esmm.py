"""ESMM: click-through and post-click conversion estimated over the entire impression space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError
from polytask.models.architectures import (
    ARCHITECTURES,
    EncoderFactory,
    HeadFactory,
    MultiTaskModel,
    MultiTaskOutput,
)
from polytask.tasks import TaskSpec

__all__ = ["ESMM", "ctcvr_logit"]


def ctcvr_logit(ctr_logit: Tensor, cvr_logit: Tensor) -> Tensor:
    """The logit of ``sigmoid(a) * sigmoid(b)``, computed exactly and stably.

    With ``p = σ(a)σ(b)``, ``1 - p = (e^-a + e^-b + e^-(a+b)) · p``, so
    ``logit(p) = -logsumexp(-a, -b, -(a + b))``: no ``log(1 - p)`` to lose precision near
    ``p = 1`` and finite gradients (a softmax) for any logits.

    Example:
        >>> a, b = torch.tensor([30.0, -30.0, 0.0]), torch.tensor([30.0, 30.0, 0.0])
        >>> torch.allclose(ctcvr_logit(a, b).sigmoid(), a.sigmoid() * b.sigmoid())
        True
    """
    return -torch.logsumexp(torch.stack([-ctr_logit, -cvr_logit, -(ctr_logit + cvr_logit)]), dim=0)


@ARCHITECTURES.register(
    "esmm", "CTR and CTR×CVR towers over a shared embedding (Ma et al., SIGIR 2018)"
)
class ESMM(MultiTaskModel):
    """Entire Space Multi-task Model (Ma, Zhao, Huang, Wang, Hu, Zhu & Gai, "Entire Space
    Multi-Task Model: An Effective Approach for Estimating Post-Click Conversion Rate", SIGIR
    2018).

    A shared encoder (``make_encoder()``: the shared embedding) feeds a CTR tower and a CVR tower
    (each built by ``make_head``, the CVR tower with the ``ctcvr_task`` spec). With tower logits
    ``a`` (CTR) and ``b`` (CVR), the model predicts ``pCTR = σ(a)`` for ``ctr_task`` and
    ``pCTCVR = pCTR × pCVR = σ(a)σ(b)`` for ``ctcvr_task``, both as logits (the binary loss takes
    logits; the CTCVR logit is ``ctcvr_logit(a, b)``). Both losses are taken over *all*
    impressions: ``ctr_task``'s label is "clicked", ``ctcvr_task``'s is "clicked and converted"
    for every impression (0 when not clicked, not missing), which is how ESMM avoids the sample
    selection bias of training pCVR on clicked impressions only. pCVR itself has no loss; it is in
    ``extras["cvr"]`` (``extras["cvr_logit"]``: ``b``). Any other task gets an ordinary head on
    the shared features.

    * ``shared_parameters()``: the shared encoder. The CTR tower is read by both losses (pCTCVR
      contains pCTR) but lies above the shared features: it counts as a task parameter and gets
      the plain gradient of the summed losses.
    * ``features``: the shared encoder's output ``[B, width]``.

    Example:
        >>> from polytask.models.encoders import MLPEncoder
        >>> from polytask.models.heads import linear_head
        >>> tasks = [TaskSpec("click", "binary"), TaskSpec("conversion", "binary")]
        >>> model = ESMM(tasks=tasks, make_encoder=lambda: MLPEncoder((6,), hidden=(8,)),
        ...              make_head=lambda task, width: linear_head(width, task))
        >>> out = model(torch.randn(4, 6))
        >>> p = out.outputs["conversion"].sigmoid()
        >>> torch.allclose(p, out.outputs["click"].sigmoid() * out.extras["cvr"])
        True
    """

    def __init__(
        self,
        *,
        tasks: Sequence[TaskSpec],
        make_encoder: EncoderFactory,
        make_head: HeadFactory,
        ctr_task: str = "click",
        ctcvr_task: str = "conversion",
    ) -> None:
        super().__init__()
        by_name = {t.name: t for t in tasks}
        known = ", ".join(by_name) or "none"
        problems = []
        for role, name in (("ctr_task", ctr_task), ("ctcvr_task", ctcvr_task)):
            if name not in by_name:
                problems.append(f"{role} {name!r} is not one of the tasks ({known})")
            elif by_name[name].kind != "binary":
                problems.append(
                    f"{role} {name!r} must be a binary task, found {by_name[name].kind}"
                )
        if ctr_task == ctcvr_task:
            problems.append(f"ctr_task and ctcvr_task must differ, both are {ctr_task!r}")
        if problems:
            raise ConfigError("esmm: " + "; ".join(problems))
        self.tasks = list(tasks)
        self.ctr_task = ctr_task
        self.ctcvr_task = ctcvr_task
        self.encoder = make_encoder()
        width = getattr(self.encoder, "out_features", None)
        if not isinstance(width, int):
            raise ConfigError(
                f"esmm: the encoder {type(self.encoder).__name__} has no integer out_features"
            )
        self.ctr_tower = make_head(by_name[ctr_task], width)
        self.cvr_tower = make_head(by_name[ctcvr_task], width)
        self.heads = nn.ModuleDict(
            {
                t.name: make_head(t, width)
                for t in self.tasks
                if t.name not in (ctr_task, ctcvr_task)
            }
        )

    def forward(self, x: Tensor) -> MultiTaskOutput:
        features = self.encoder(x)
        ctr = self.ctr_tower(features)
        cvr = self.cvr_tower(features)
        outputs: dict[str, Tensor] = {}
        for task in self.tasks:  # the tasks' order
            if task.name == self.ctr_task:
                outputs[task.name] = ctr
            elif task.name == self.ctcvr_task:
                outputs[task.name] = ctcvr_logit(ctr, cvr)
            else:
                outputs[task.name] = self.heads[task.name](features)
        return MultiTaskOutput(outputs, features, {"cvr": torch.sigmoid(cvr), "cvr_logit": cvr})

    def shared_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]
