"""Export a trained run to ONNX: one graph from raw input tensors to every task's decoded
prediction, and the preprocessing JSON the torch-free runtime (``polytask.serve.onnx_runtime``)
applies before it.

The graph standardises numeric features (``standardize``), normalises images
(``channel_norm``) and scales waveforms (``waveform``) with the run's fitted statistics, runs the
model, and decodes each task: class probabilities and the label (multiclass), the probability of
1 (binary, multilabel), values in original units (regression, de-standardised in the graph);
per pixel for the dense kinds: class probabilities and the class map (segmentation), depth in
original units, unit normals. Every input and output has a dynamic batch dimension. What cannot
be a graph operation — the categorical vocabularies, the text tokenizer — is written to
``<stem>.preprocess.json`` (``PREPROCESS_FORMAT``) beside the model, with the input schema and
the tasks.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from polytask import __version__
from polytask.data.audio import WaveformScaler
from polytask.data.images import ChannelNormalizer
from polytask.data.preprocess import CategoryVocabulary, Preprocessor, Standardizer
from polytask.data.text import TextTokenizer
from polytask.errors import ExportError
from polytask.io import atomic_path, write_text_atomic
from polytask.models import MultiTaskModel
from polytask.run.folder import RunFolder, TrainedModel
from polytask.serve.onnx_runtime import (
    PLAIN_INPUT,
    PREPROCESS_FORMAT,
    PRESENT_SUFFIX,
    file_sha256,
    preprocess_path_for,
)
from polytask.serve.onnx_tokenizer import check_supported
from polytask.tasks import TaskSpec

Quantize = Literal["int8", "fp16"]


@dataclass(frozen=True)
class ExportResult:
    """What ``export_onnx`` wrote: the model, its preprocessing JSON, and how it was made."""

    model_path: Path
    preprocess_path: Path
    opset: int
    exporter: str
    quantize: str | None
    size_bytes: int
    sha256: str


# ----------------------------------------------------------------------------- the graph
@dataclass
class GraphInput:
    """One input of the exported graph: a block of the model's input (``key``; ``""`` for a
    one-tensor model), where its values come from (``source``: numeric, categorical, text,
    tensor, present) and its per-row shape."""

    name: str
    key: str
    source: str
    shape: list[int]
    preprocessor: Preprocessor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.int64 if self.source in ("categorical", "text") else torch.float32


class ExportGraph(nn.Module):
    """Raw input tensors (positional, in the order of ``inputs``) → each task's decoded
    prediction (and, for multiclass and segmentation tasks, the label or label map); what
    ``export_onnx`` traces.

    A ``<block>_present`` input holds 1 (present), 0 (missing) or -1 (unknown: the model's own
    rule decides, a block of all zeros being missing)."""

    def __init__(
        self, model: MultiTaskModel, tasks: Sequence[TaskSpec], inputs: Sequence[GraphInput]
    ) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(tasks)
        self.inputs = list(inputs)
        for i, entry in enumerate(self.inputs):
            shift, scale = _affine(entry.preprocessor)
            if shift is not None:
                self.register_buffer(f"shift_{i}", shift)
            if scale is not None:
                self.register_buffer(f"scale_{i}", scale)

    def output_names(self) -> list[str]:
        names = []
        for task in self.tasks:
            names.append(task.name)
            if task.kind in ("multiclass", "segmentation"):
                names.append(f"{task.name}.label")
        return names

    def forward(self, *raw: Tensor) -> tuple[Tensor, ...]:
        blocks: dict[str, Tensor] = {}
        for i, (entry, x) in enumerate(zip(self.inputs, raw, strict=True)):
            shift, scale = getattr(self, f"shift_{i}", None), getattr(self, f"scale_{i}", None)
            if shift is not None:
                x = x - shift
            if scale is not None:
                x = x / scale
            blocks[entry.key] = x
        for entry in self.inputs:
            if entry.source == "present":
                block = blocks[entry.key[: -len(PRESENT_SUFFIX)]]
                seen = block.reshape(block.shape[0], -1).ne(0).any(dim=1).to(torch.float32)
                flag = blocks[entry.key]
                blocks[entry.key] = torch.where(flag < 0, seen, flag)
        x_in: Any = blocks.get("", blocks)
        outputs = self.model(x_in).outputs
        decoded: list[Tensor] = []
        for task in self.tasks:
            value = task.decode(outputs[task.name])
            decoded.append(value)
            if task.kind == "multiclass":
                decoded.append(value.argmax(dim=-1))
            elif task.kind == "segmentation":  # the class of each pixel
                decoded.append(value.argmax(dim=1))
        return tuple(decoded)


def _affine(pre: Preprocessor | None) -> tuple[Tensor | None, Tensor | None]:
    """(shift, scale) of an in-graph preprocessor: ``(x - shift) / scale``."""
    if isinstance(pre, Standardizer):
        assert pre.mean is not None and pre.std is not None
        return pre.mean.float(), pre.std.float()
    if isinstance(pre, ChannelNormalizer):
        assert pre.mean is not None and pre.std is not None
        as_channels = (len(pre.mean), 1, 1)
        return (
            torch.tensor(pre.mean, dtype=torch.float32).reshape(as_channels),
            torch.tensor(pre.std, dtype=torch.float32).reshape(as_channels),
        )
    if isinstance(pre, WaveformScaler):
        assert pre.rms is not None
        return None, torch.tensor(pre.rms, dtype=torch.float32)
    return None, None


def graph_inputs(trained: TrainedModel) -> list[GraphInput]:
    """The graph's inputs for ``trained``, one per input block; ``ExportError`` names a block
    whose preprocessing the export does not know."""
    shape = trained.input_shape
    if not isinstance(shape, dict):
        pre = trained.preprocessors.get("")
        _check_preprocessor("input", pre, (Standardizer, ChannelNormalizer))
        return [
            GraphInput(
                PLAIN_INPUT, "", "numeric" if trained.feature_names else "tensor", list(shape), pre
            )
        ]
    out = []
    for key, entry in shape.items():
        pre = trained.preprocessors.get(key)
        if key.endswith(PRESENT_SUFFIX) and key[: -len(PRESENT_SUFFIX)] in shape:
            source = "present"
        elif isinstance(pre, CategoryVocabulary):
            source = "categorical"
        elif isinstance(pre, TextTokenizer):
            source = "text"
        elif key == "numeric" and trained.feature_names:
            source = "numeric"
        else:
            _check_preprocessor(key, pre, (Standardizer, ChannelNormalizer, WaveformScaler))
            source = "tensor"
        out.append(GraphInput(key, key, source, list(entry["shape"]), pre))
    return out


def _check_preprocessor(block: str, pre: Preprocessor | None, known: tuple[type, ...]) -> None:
    if pre is not None and not isinstance(pre, known):
        raise ExportError(
            f"input block {block!r}: its preprocessor {getattr(pre, 'kind', type(pre).__name__)!r}"
            " cannot be exported (in the graph: standardize, channel_norm, waveform)"
        )


def example_inputs(inputs: Sequence[GraphInput], rows: int = 2) -> tuple[Tensor, ...]:
    """Inputs to trace the graph with: ``rows`` rows of valid values for each input."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for entry in inputs:
        if entry.dtype == torch.int64:
            out.append(torch.ones(rows, *entry.shape, dtype=torch.int64))
        elif entry.source == "present":
            out.append(torch.ones(rows, dtype=torch.float32))
        else:
            out.append(torch.randn(rows, *entry.shape, generator=generator))
    return tuple(out)


# ----------------------------------------------------------------------------- exporting
@contextlib.contextmanager
def _module_trail(model: nn.Module) -> Iterator[list[tuple[str, str]]]:
    """The (name, class) of the modules being run, innermost last, while tracing (so a failure
    names the module it happened in)."""
    trail: list[tuple[str, str]] = []
    handles = []
    for name, module in model.named_modules():

        def enter(module: nn.Module, args: Any, name: str = name) -> None:
            trail.append((name, type(module).__name__))

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            if trail:
                trail.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    failed: list[tuple[str, str]] = []
    try:
        yield failed
    except BaseException:
        failed[:] = list(trail)
        raise
    finally:
        for handle in handles:
            handle.remove()


_SCOPE = re.compile(r"scope: (\S+)")


def _scope_of(message: str) -> str | None:
    """The module a TorchScript export error names (``scope: pkg.Graph::/pkg.Model::model/
    pkg.LogMel::melspec``), as ``module 'model.melspec' (LogMel)``."""
    scopes = _SCOPE.findall(message)
    if not scopes:
        return None
    parts = [p.split("::") for p in scopes[0].split("/") if "::" in p]
    names = [name for _, name in parts if name]
    if not names:
        return None
    return f"module {'.'.join(names)!r} ({parts[-1][0].rsplit('.', 1)[-1]})"


_NODE = re.compile(r"translating node %(\w+)")


def _module_of_node(graph: nn.Module, example: tuple[Tensor, ...], message: str) -> str | None:
    """The module holding the node the dynamo exporter could not translate (``translating node
    %linalg_eig``), from the ``nn_module_stack`` of ``torch.export``'s graph."""
    found = _NODE.search(message)
    if found is None:
        return None
    name = found.group(1)
    try:
        with _quiet():
            program = torch.export.export(graph, example, strict=False).run_decompositions()
    except Exception:  # only a better message is at stake
        return None
    for node in program.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.name == name and stack:
            path, kind = list(stack.values())[-1]
            label = getattr(kind, "__name__", None) or str(kind).rsplit(".", 1)[-1]
            return f"module {path!r} ({label.strip(chr(39) + '>')})"
    return None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUMMARY = re.compile(r"^<class '[\w.]+'>: (.+)$", re.MULTILINE)


def _one_line(exc: BaseException) -> str:
    """The reason in one line: the dynamo exporter's exception summary (its first cause), or
    the first line of the message."""
    message = _ANSI.sub("", str(exc))
    summary = _SUMMARY.findall(message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = summary[0] if summary else lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def trace_to_onnx(
    graph: nn.Module,
    example: tuple[Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    path: Path,
    *,
    opset: int | None = None,
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto",
) -> str:
    """Export ``graph`` to ``path`` with a dynamic batch dimension on every input and output:
    ``torch.onnx``'s dynamo exporter, or (``auto``, when that fails) the TorchScript one;
    returns the exporter used. ``ExportError`` names the module that stopped both."""
    tries = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    failures: list[tuple[list[tuple[str, str]], Exception]] = []
    for kind in tries:
        try:
            with _module_trail(graph) as trail, _quiet():
                _export_with(kind, graph, example, input_names, output_names, path, opset)
            return kind
        except ExportError:
            raise
        except Exception as exc:  # the exporters raise many types, all of them mean "cannot"
            failures.append((list(trail), exc))
    for modules, error in failures:  # the first failure that names a module
        where = (
            f"module {modules[-1][0] or 'model'!r} ({modules[-1][1]})"
            if modules
            else _scope_of(str(error)) or _module_of_node(graph, example, str(error))
        )
        if where:
            break
    first = failures[0][1]
    where = where or f"model {type(graph).__name__}"
    raise ExportError(f"export: {where} cannot be exported to ONNX: {_one_line(first)}") from first


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' progress lines and warnings go nowhere (errors are still raised)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]  # the TorchScript exporter prints its graph from C++
    try:
        with (
            open(os.devnull, "w") as devnull,
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            warnings.simplefilter("ignore")
            yield
    finally:
        for fd, copy in enumerate(saved, start=1):
            os.dup2(copy, fd)
            os.close(copy)


def _export_with(
    kind: str,
    graph: nn.Module,
    example: tuple[Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    path: Path,
    opset: int | None,
) -> None:
    """One ``torch.onnx.export`` call with ``kind``'s way of saying "the batch is dynamic"."""
    options: dict[str, Any]
    if kind == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        shapes: tuple[Any, ...] = tuple({0: batch} for _ in example)
        parameters = inspect.signature(graph.forward).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
            shapes = (shapes,)  # forward(*raw): one entry, the tuple of them
        options = {"dynamic_shapes": shapes, "opset_version": opset, "external_data": False}
    else:
        axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
        options = {"dynamic_axes": axes, "opset_version": opset or 17}
    torch.onnx.export(
        graph,
        example,
        str(path),
        input_names=list(input_names),
        output_names=list(output_names),
        dynamo=kind == "dynamo",
        **options,
    )


def export_onnx(
    run_dir: str | Path,
    output: str | Path | None = None,
    *,
    quantize: Quantize | None = None,
    opset: int | None = None,
    checkpoint: str = "best",
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto",
) -> ExportResult:
    """Export the run in ``run_dir`` to ONNX: ``output`` (default ``RUN_DIR/export/model.onnx``)
    and ``<stem>.preprocess.json`` beside it, both written atomically.

    Args:
        quantize: ``int8`` (dynamic int8 quantization of the weights, onnxruntime) or ``fp16``
            (half-precision weights and arithmetic; inputs and outputs stay float32).
        opset: the ONNX opset (the exporter's default when ``None``).
        checkpoint: ``best`` or ``last``.
        exporter: ``dynamo`` (``torch.onnx``'s ``torch.export`` path), ``torchscript``, or
            ``auto``: dynamo, and TorchScript when dynamo fails.

    ``ExportError`` (one line) names the module or preprocessing step that cannot be exported.
    """
    folder = RunFolder(run_dir)
    trained = folder.load_trained(checkpoint)
    model_path = Path(output) if output is not None else folder.path / "export" / "model.onnx"
    if model_path.suffix != ".onnx":
        raise ExportError(f"{model_path}: the output must be an .onnx file")
    if quantize not in (None, "int8", "fp16"):
        raise ExportError(f"quantize: int8 or fp16, found {quantize!r}")
    inputs = graph_inputs(trained)
    optional = _optional_blocks(inputs)
    entries = [_input_entry(e, trained, optional) for e in inputs]  # checks the tokenizer first
    graph = ExportGraph(trained.model, trained.tasks, inputs).eval()
    model_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(model_path) as temporary:
        used = trace_to_onnx(
            graph,
            example_inputs(inputs),
            [e.name for e in inputs],
            graph.output_names(),
            temporary,
            opset=opset,
            exporter=exporter,
        )
        actual_opset = _strip_debug_info(temporary)
        if quantize is not None:
            from polytask.serve.compress import quantize_onnx

            with _quiet():  # onnxruntime logs every tensor it leaves in float
                quantize_onnx(temporary, temporary, quantize)
    sha = file_sha256(model_path)
    spec = {
        "format": PREPROCESS_FORMAT,
        "polytask_version": __version__,
        "model": {
            "file": model_path.name,
            "sha256": sha,
            "opset": actual_opset,
            "exporter": used,
            "quantize": quantize,
            "run": trained.config.name,
            "run_dir": str(folder.path),
            "checkpoint": checkpoint,
        },
        "tasks": [_task_entry(t) for t in trained.tasks],
        "inputs": entries,
        "columns": input_columns(inputs, trained),
    }
    preprocess_path = preprocess_path_for(model_path)
    write_text_atomic(preprocess_path, json.dumps(spec, indent=1))
    return ExportResult(
        model_path=model_path,
        preprocess_path=preprocess_path,
        opset=actual_opset,
        exporter=used,
        quantize=quantize,
        size_bytes=model_path.stat().st_size,
        sha256=sha,
    )


def _strip_debug_info(path: Path) -> int:
    """Drop the exporter's per-node debugging metadata (source stack traces: two thirds of a
    small model's file) from the model at ``path``; returns its opset."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(model, str(path))
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _task_entry(task: TaskSpec) -> dict[str, Any]:
    """A task of the preprocessing JSON: kind, classes, graph output, prediction columns."""
    classes: list[int] | None
    if task.kind in ("multiclass", "segmentation"):
        columns, classes = [task.name], list(range(task.num_classes))
    elif task.kind in ("depth", "normals"):  # one map per row (``onnx_runtime.dense_column``)
        columns, classes = [task.name], None
    elif task.kind == "binary":
        columns, classes = [task.name], [0, 1]
    else:
        several = task.num_classes > 1
        columns = [f"{task.name}_{i}" for i in range(task.num_classes)] if several else [task.name]
        classes = list(range(task.num_classes)) if task.kind == "multilabel" else None
    return {
        "name": task.name,
        "kind": task.kind,
        "num_classes": task.num_classes,
        "classes": classes,
        "output": task.name,
        "columns": columns,
    }


def _optional_blocks(inputs: Sequence[GraphInput]) -> set[str]:
    return {e.key[: -len(PRESENT_SUFFIX)] for e in inputs if e.source == "present"}


def _input_entry(entry: GraphInput, trained: TrainedModel, optional: set[str]) -> dict[str, Any]:
    """The JSON of one graph input: what the runtime does to build it from raw columns
    (``optional``: the blocks a row may lack)."""
    out: dict[str, Any] = {"name": entry.name, "source": entry.source, "shape": entry.shape}
    if entry.source == "numeric":
        out["columns"] = list(trained.feature_names or [])
    elif entry.source == "categorical":
        assert isinstance(entry.preprocessor, CategoryVocabulary)
        out["columns"] = list(entry.preprocessor.columns)
        out["vocab"] = entry.preprocessor.vocab
    elif entry.source == "text":
        assert isinstance(entry.preprocessor, TextTokenizer)
        tokenizer = json.loads(entry.preprocessor.tokenizer.to_str())
        check_supported(tokenizer)
        out.update(column=entry.key, tokenizer=tokenizer, max_length=entry.preprocessor.max_length)
    elif entry.source == "present":
        out.update(column=entry.key, block=entry.key[: -len(PRESENT_SUFFIX)])
    else:
        out["column"] = entry.key or PLAIN_INPUT
    out["optional"] = entry.source == "present" or entry.key in optional
    return out


def input_columns(inputs: Sequence[GraphInput], trained: TrainedModel) -> list[dict[str, Any]]:
    """The raw columns a request gives (the runtime's ``input_schema``)."""
    optional = _optional_blocks(inputs)
    columns: list[dict[str, Any]] = []
    for entry in inputs:
        if entry.source == "numeric":
            columns += [_column(n, "float64", []) for n in trained.feature_names or []]
        elif entry.source == "categorical":
            assert isinstance(entry.preprocessor, CategoryVocabulary)
            columns += [
                _column(n, "string", [], categorical=True) for n in entry.preprocessor.columns
            ]
        elif entry.source == "text":
            columns.append(_column(entry.key, "string", [], optional=entry.key in optional))
        elif entry.source == "present":
            columns.append(_column(entry.key, "bool", [], optional=True))
        else:
            columns.append(
                _column(
                    entry.key or PLAIN_INPUT, "float32", entry.shape, optional=entry.key in optional
                )
            )
    return columns


def table_rows(inputs: Any, index: Sequence[int] | np.ndarray) -> Any:
    """Rows ``index`` of a table's raw inputs (``MultiLabelTable.inputs``: an array, or a dict
    of blocks, texts as lists)."""
    if not isinstance(inputs, dict):
        return np.asarray(inputs)[index]
    return {
        key: [block[i] for i in index] if isinstance(block, list) else np.asarray(block)[index]
        for key, block in inputs.items()
    }


def request_columns(trained: TrainedModel, raw: Any) -> dict[str, Any]:
    """Raw inputs (as the run's table holds them) → the torch-free runtime's named columns: one
    per numeric feature and categorical column, one per other block (``input`` for a one-tensor
    model without feature names)."""
    if not isinstance(raw, dict):
        if trained.feature_names:
            return {n: raw[:, j] for j, n in enumerate(trained.feature_names)}
        return {PLAIN_INPUT: raw}
    columns: dict[str, Any] = {}
    for key, block in raw.items():
        if key == "numeric":
            columns.update({n: block[:, j] for j, n in enumerate(trained.feature_names or [])})
        elif key == "categorical":
            names = trained.categorical_names or []
            columns.update({n: block[:, j] for j, n in enumerate(names)})
        else:
            columns[key] = block
    return columns


def _column(
    name: str, dtype: str, shape: list[int], *, categorical: bool = False, optional: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "dtype": dtype,
        "shape": shape,
        "categorical": categorical,
        "optional": optional,
    }


__all__ = [
    "PLAIN_INPUT",
    "ExportGraph",
    "ExportResult",
    "export_onnx",
    "graph_inputs",
    "request_columns",
    "table_rows",
]
