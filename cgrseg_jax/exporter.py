"""The eval forward of a registered model as a file other runtimes load, and its check.

Three formats, one function each, all from the same JAX function
`x -> model.apply(variables, x, train=False)` with the weights baked in as
constants (NHWC float32 normalised RGB in, logits (N, H, W, K) float32 at the
input size out):

  stablehlo  `jax.export` (serialised StableHLO; any JAX of the same or a
             newer version calls it, on the platforms it was lowered for).
  onnx       jax2onnx: the JAX function traced to ONNX ops directly, so the
             file is the model that was trained, not a re-implementation.
  tflite     the StableHLO of `jax.export` handed to LiteRT's converter
             (litert-converter, the one litert-torch drives), which legalises
             StableHLO to TFLite ops; the interpreter is ai-edge-litert.

Why these routes: both convert the JAX program itself, so every registered
family exports through the same code and a converted model can be checked
against the JAX forward it came from. The alternative, the project's PyTorch
reference through `torch.onnx` / litert-torch, would export a second
implementation and needs one per family; jax2tf + TensorFlow's converter
would add TensorFlow (2 GB) for a converter that LiteRT's now ships alone.

Height and width are fixed in every format: the models build their resampling
tables (bilinear taps, pooling bins, resized attention biases) from the static
spatial size. The batch is symbolic or fixed for StableHLO; ONNX and TFLite
files have a fixed batch (jax2onnx 0.17 fails on a symbolic batch inside these
models' reshapes; LiteRT files are fixed-shape).

`verify` runs a file in its runtime (jax.export, onnxruntime, the LiteRT
interpreter) and compares it with the JAX forward: max abs and relative
error, argmax agreement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

FORMATS = ('stablehlo', 'onnx', 'tflite')
FILES = {'stablehlo': 'forward.jaxexport', 'onnx': 'forward.onnx', 'tflite': 'forward.tflite'}
# What each format needs beyond the base install (the `export` extra; README).
FIXED_BATCH = ('onnx', 'tflite')
NEEDS = {'onnx': ('jax2onnx', 'onnx', 'onnxruntime'), 'tflite': ('litert_converter', 'ai_edge_litert')}


class ExportError(Exception):
  """A format that cannot be written or run here, said in one line."""


def forward_fn(model, variables) -> Callable:
  return lambda x: model.apply(variables, x, train=False)


def _spec(height: int, width: int, batch: Optional[int]):
  n = jax_export.symbolic_shape('b')[0] if batch is None else int(batch)
  return jax.ShapeDtypeStruct((n, height, width, 3), jnp.float32)


def to_stablehlo(fn, height: int, width: int, batch: Optional[int] = None, platforms=None) -> jax_export.Exported:
  """`jax.export.Exported` of `fn`; `batch=None` -> symbolic batch."""
  return jax_export.export(jax.jit(fn), platforms=platforms)(_spec(height, width, batch))


def _require(fmt: str):
  missing = []
  for module in NEEDS.get(fmt, ()):
    try:
      __import__(module)
    except ImportError:
      missing.append(module)
  if missing:
    raise ExportError(
      f'--format={fmt} needs {", ".join(missing)}: pip install -e .[export] and then '
      'pip install --no-deps -r requirements-nodeps.txt (jax2onnx; README "Export")'
    )


def to_onnx(fn, height: int, width: int, batch: int = 1) -> bytes:
  """ONNX (jax2onnx's default opset) of `fn` at a fixed batch, as bytes."""
  _require('onnx')
  # jax2onnx imports its example plugins on first use and logs a traceback for each one
  # whose optional library (equinox, dm_pix) is absent; none of them is used here.
  logging.getLogger('jax2onnx').setLevel(logging.ERROR)
  from jax2onnx import to_onnx as jax2onnx_to_onnx  # the export extra, optional

  with _linear_output_check():
    proto = jax2onnx_to_onnx(fn, [(int(batch), height, width, 3)])
  return proto.SerializeToString()


@contextlib.contextmanager
def _linear_output_check():
  """jax2onnx 0.17 checks after every equation that its outputs are in the graph
  by scanning every node built so far: quadratic, 6 of the 7 minutes of a
  CGRSeg-T export. A value whose producer node belongs to the builder's graph is
  such an output, so that answer is given at once; every other value still goes
  through the original scan, so the answers are the same."""
  from jax2onnx.converter import output_binding  # the export extra, optional

  scan = output_binding._value_is_graph_connected

  def connected(ctx, value):
    producer = value.producer() if hasattr(value, 'producer') else None
    if producer is not None and producer.graph is ctx.builder.nodes:
      return True
    return scan(ctx, value)

  output_binding._value_is_graph_connected = connected
  try:
    yield
  finally:
    output_binding._value_is_graph_connected = scan


def to_tflite(fn, height: int, width: int, batch: int = 1) -> bytes:
  """A TFLite flatbuffer of `fn` at a fixed batch, through LiteRT's StableHLO converter."""
  _require('tflite')
  from litert_converter.mlir import ir, passmanager  # the export extra, optional
  from litert_converter.mlir._mlir_libs import converter_api_ext  # (also)

  text = to_stablehlo(fn, height, width, int(batch), platforms=['cpu']).mlir_module()
  context = ir.Context()
  converter_api_ext.prepare_mlir_context(context)
  with context:
    module = ir.Module.parse(text)
    # jax.export keeps nested jits as private functions; the TFLite legalisation wants one body.
    passmanager.PassManager.parse('builtin.module(inline)').run(module.operation)
    converter_api_ext.set_signature(
      module.operation, signature_name='serving_default', input_names=['image'], output_names=['logits']
    )
    config = converter_api_ext.ConvertToTFLConfig()
    config.model_origin_framework = 'JAX'
    try:
      converter_api_ext.run_convert_to_tfl_passes(module, passmanager.PassManager(), config)
    except ValueError as e:
      raise ExportError(f'LiteRT could not convert the model: {str(e).splitlines()[0]}') from None
    return converter_api_ext.export_flatbuffer_to_bytes(module.operation)


def write(fmt: str, fn, path: str, height: int, width: int, batch: Optional[int], platforms=None) -> dict:
  """Write `fn` in `fmt` to `path`; returns {'bytes', 'seconds', ...} for the meta file."""
  if fmt not in FORMATS:
    raise ExportError(f'--format={fmt!r}; expected one of {", ".join(FORMATS)}')
  if fmt in FIXED_BATCH and batch is None:
    raise ExportError(f'--format={fmt} has a fixed batch: pass --batch=N (e.g. --batch=1)')
  start = time.perf_counter()
  extra = {}
  if fmt == 'stablehlo':
    exported = to_stablehlo(fn, height, width, batch, platforms)
    blob = exported.serialize()
    extra['platforms'] = list(exported.platforms)
  elif fmt == 'onnx':
    blob = to_onnx(fn, height, width, batch)
  else:
    blob = to_tflite(fn, height, width, batch)
  with open(path, 'wb') as f:
    f.write(blob)
  return dict(format=fmt, file=path, bytes=len(blob), seconds=round(time.perf_counter() - start, 2), **extra)


# ---------------------------------------------------------------- running the files


def runner(fmt: str, path: str) -> Callable[[np.ndarray], np.ndarray]:
  """`run(x NHWC float32) -> logits` executing the file at `path` in its own runtime."""
  if fmt == 'stablehlo':
    with open(path, 'rb') as f:
      exported = jax_export.deserialize(bytearray(f.read()))
    return lambda x: np.asarray(exported.call(x))
  _require(fmt)
  if fmt == 'onnx':
    import onnxruntime  # the export extra, optional

    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]
  from ai_edge_litert.interpreter import Interpreter  # the export extra, optional

  interpreter = Interpreter(model_path=path)
  interpreter.allocate_tensors()
  (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()

  def run(x):
    if tuple(x.shape) != tuple(inp['shape']):
      raise ExportError(f'{path}: input {tuple(x.shape)}; this TFLite file takes {tuple(inp["shape"])}')
    interpreter.set_tensor(inp['index'], np.ascontiguousarray(x, np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(out['index']).copy()

  return run


@dataclasses.dataclass
class Agreement:
  """How a runtime's logits compare with the JAX forward's on the same inputs."""

  max_abs: float  # max |runtime - jax|
  max_rel: float  # max_abs / max |jax|: the scale of the logits, not per element (near-zero logits)
  argmax_agreement: float  # fraction of pixels with the same class
  pixels: int
  runtime_ms: float  # per batch, median of the timed runs after a warm-up
  jax_ms: float

  def ok(self, rtol: float, min_agreement: float) -> bool:
    return self.max_rel <= rtol and self.argmax_agreement >= min_agreement


def _median_ms(fn, x, repeats: int) -> float:
  fn(x)  # warm-up: compilation, allocation
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def compare(run, fn, inputs: list[np.ndarray], repeats: int = 3) -> Agreement:
  """Run both on every batch of `inputs`; time them on the first."""
  reference = jax.jit(fn)
  max_abs = scale = 0.0
  same = pixels = 0
  for x in inputs:
    got, want = np.asarray(run(x)), np.asarray(reference(x))
    if got.shape != want.shape:
      raise ExportError(f'the exported forward gave {got.shape}; the JAX forward gives {want.shape}')
    max_abs = max(max_abs, float(np.abs(got - want).max()))
    scale = max(scale, float(np.abs(want).max()))
    same += int((got.argmax(-1) == want.argmax(-1)).sum())
    pixels += int(np.prod(want.shape[:-1]))
  return Agreement(
    max_abs=max_abs,
    max_rel=max_abs / max(scale, 1e-30),
    argmax_agreement=same / pixels,
    pixels=pixels,
    runtime_ms=_median_ms(run, inputs[0], repeats),
    jax_ms=_median_ms(reference, inputs[0], repeats),
  )
