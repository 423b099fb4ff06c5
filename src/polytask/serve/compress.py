"""Smaller models: int8 and fp16 ONNX graphs (onnxruntime), dynamic int8 quantization of the
PyTorch model (``torch.ao``), and magnitude pruning with a fine-tuning epoch."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from polytask.errors import ConfigError, ExportError

if TYPE_CHECKING:
    from polytask.run.single import RunResult


def quantize_onnx(source: str | Path, target: str | Path, kind: str) -> None:
    """Write ``source`` (an fp32 ONNX model) to ``target`` (may be the same file) as ``int8``
    (onnxruntime's dynamic quantization: int8 weights of MatMul/Gemm, activations quantized per
    batch at run time) or ``fp16`` (half-precision weights and arithmetic, float32 inputs and
    outputs)."""
    import onnx

    source, target = Path(source), Path(target)
    if kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        prepared = target.with_name(f".{target.name}.pre.onnx")
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
        finally:
            prepared.unlink(missing_ok=True)
    elif kind == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(source))
        onnx.save(convert_float_to_float16(model, keep_io_types=True), str(target))
    else:
        raise ExportError(f"quantize: int8 or fp16, found {kind!r}")


# ----------------------------------------------------------------------------- PyTorch models
def quantize_torch(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantized to int8
    (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations quantized per batch);
    CPU only, for inference."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


#: the layers whose weights magnitude pruning zeroes (embeddings, norms and biases are kept)
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def magnitude_masks(model: nn.Module, amount: float) -> dict[nn.Parameter, Tensor]:
    """Global magnitude pruning: zero the fraction ``amount`` of the smallest-magnitude weights
    over every ``PRUNABLE`` layer of ``model`` (in place) and return each weight's keep-mask."""
    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"prune: a fraction of weights in [0, 1), found {amount}")
    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    if not weights:
        raise ConfigError(f"prune: {type(model).__name__} has no Linear or Conv layer to prune")
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    cut = int(amount * magnitudes.numel())
    threshold = magnitudes.kthvalue(cut).values if cut > 0 else magnitudes.min() - 1
    masks = {cast(nn.Parameter, w): (w.detach().abs() > threshold).to(w.dtype) for w in weights}
    apply_masks(masks)
    return masks


@torch.no_grad()
def apply_masks(masks: dict[nn.Parameter, Tensor]) -> None:
    """Zero the pruned weights again (after an optimizer step moved them)."""
    for weight, mask in masks.items():
        weight.mul_(mask.to(weight.device))


def sparsity(model: nn.Module) -> float:
    """The fraction of exactly-zero weights over ``model``'s ``PRUNABLE`` layers."""
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, PRUNABLE)]
    total = sum(w.numel() for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights) / max(total, 1))


def prune_run(
    run_dir: str | Path,
    amount: float,
    *,
    epochs: int = 1,
    lr_scale: float = 0.1,
    checkpoint: str = "best",
    progress: bool | None = None,
) -> RunResult:
    """Magnitude-prune the model of the run in ``run_dir`` (the fraction ``amount`` of its
    Linear/Conv weights, globally smallest first) and fine-tune it for ``epochs`` epochs on the
    run's own data at ``lr_scale`` times its learning rate, with a constant schedule; pruned
    weights stay exactly zero (re-masked after every optimizer step). The result is a new run
    folder beside ``run_dir`` (``<name>-pruned<percent>``), evaluated on the test split like
    any run: ``polytask export`` and ``predict`` read it as they read the teacher."""
    from polytask.run.folder import RunFolder
    from polytask.run.single import train_run
    from polytask.train.trainer import Trainer

    folder = RunFolder(run_dir)
    trained = folder.load_trained(checkpoint)
    config = trained.config
    if epochs < 1:
        raise ConfigError(f"prune: at least one fine-tuning epoch, found {epochs}")
    config = config.model_copy(
        update={
            "name": f"{config.name}-pruned{round(amount * 100)}",
            "output_dir": str(folder.path.parent),
            "optimizer": config.optimizer.model_copy(update={"lr": config.optimizer.lr * lr_scale}),
            "schedule": config.schedule.model_copy(
                update={"name": "constant", "warmup_epochs": 0.0}
            ),
            "train": config.train.model_copy(update={"epochs": epochs}),
        }
    )

    def pruned_trainer(model: nn.Module, *args: Any, **kwargs: Any) -> Trainer:
        model.load_state_dict(trained.model.state_dict())
        masks = magnitude_masks(model, amount)
        kwargs["optimizer"].register_step_post_hook(lambda *_: apply_masks(masks))
        return Trainer(model, *args, **kwargs)  # type: ignore[arg-type]

    return train_run(config, make_trainer=pruned_trainer, progress=progress)


def serialized_bytes(model: nn.Module) -> int:
    """The size of ``model``'s weights as ``torch.save`` writes them (quantized layers hold
    packed int8 weights, which safetensors cannot store); measured in memory only."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def evaluate_quantized_torch(run_dir: str | Path, *, checkpoint: str = "best") -> dict[str, Any]:
    """The test metrics and weight sizes of the run's PyTorch model in fp32 and with dynamic
    int8 ``Linear`` layers (``quantize_torch``), on the CPU."""
    from polytask.evaluate import evaluate
    from polytask.run.data import build_data, eval_batches
    from polytask.run.folder import RunFolder

    folder = RunFolder(run_dir)
    trained = folder.load_trained(checkpoint)
    bundle = build_data(trained.config)
    folder.check_data(bundle, checkpoint)
    models = {"fp32": trained.model.cpu(), "int8": quantize_torch(trained.model)}
    report: dict[str, Any] = {"run": str(folder.path), "checkpoint": checkpoint}
    for name, model in models.items():
        report[f"size_{name}"] = serialized_bytes(model)
        batches = eval_batches(trained.config, bundle, "test")
        report[f"test_{name}"] = evaluate(model, batches, bundle.tasks, device="cpu")  # type: ignore[arg-type]
    return report
