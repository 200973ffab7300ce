"""Model families behind one small interface.

A family module declares, next to its model, one `ModelFamily` (its variants,
how to build them, which logits the loss reads, its PyTorch key layout, how to
recognise its checkpoints, its optimizer and loss) and calls `register(family)`;
the package's own families register when `cgrseg_jax.models` is imported. The
rest of the package (training, conversion, loading, inference, scripts) only
talks to families through this module, so a new family (or a test's toy
family) needs no change elsewhere.

  model = build_model('cgrseg_t', num_classes=150, dtype=jnp.bfloat16)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cgrseg_jax import errors
from cgrseg_jax.models.key_layout import KeyLayout

# What every family's `recipe` names: the training recipe pieces a config may leave unset.
RECIPE_FIELDS = ('optimizer.name', 'loss')


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """What the package needs to know about one family of segmentation models."""

  # Family name, e.g. 'cgrseg'; also the default prefix of its model names.
  name: str
  # Registered model name -> keyword arguments of `build` (e.g. 'cgrseg_t' -> {'variant': 't'}).
  variants: Mapping[str, Mapping[str, Any]]
  # build(num_classes=..., dtype=..., **variant_kwargs, **overrides) -> flax Module whose
  # `__call__(x, train)` gives logits (N, H, W, K) at the input size.
  build: Callable[..., nn.Module]
  # PyTorch state-dict layout the converter walks.
  key_layout: KeyLayout
  # detect(state_dict) -> (model name, num_classes); raises ConversionError naming
  # the key/shape that does not fit when the state dict is not of this family.
  detect: Callable[[Mapping[str, Any]], tuple[str, int]]
  # Method whose logits the training loss uses, and their stride w.r.t. the input
  # (the labels are compared at full size; the loss resizes the logits).
  loss_method: str = '__call__'
  loss_stride: int = 1
  # ImageNet-backbone loading: detect_backbone(state) -> model names the backbone
  # fits (raises ConversionError if it is not one), load_backbone(state,
  # template) -> (variables, LoadReport) filling the template's backbone part.
  detect_backbone: Optional[Callable[[Mapping[str, Any]], list[str]]] = None
  load_backbone: Optional[Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[dict, Any]]] = None
  # Parameter paths upstream never trains (its optimizer never sees them), frozen
  # when `config.optimizer.upstream_frozen` is set.
  upstream_frozen: tuple[tuple[str, ...], ...] = ()
  # Training recipe: the value of each of `RECIPE_FIELDS` for a config that leaves
  # it unset (`recipe_value`), e.g. {'optimizer.name': 'sgd', 'loss': 'ohem'}.
  recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # torch_reference(name, num_classes) -> the project's own PyTorch model with the
  # upstream key layout (cgrseg_jax/torch_reference/, `torch` extra), for parity
  # checks; methods it shares by name with the Flax model are compared.
  torch_reference: Optional[Callable[[str, int], Any]] = None
  # config.model fields passed to `build` when set (e.g. drop_path_rate, depthwise).
  build_options: tuple[str, ...] = ()
  # Input size the variable shapes are traced at (any size the model accepts).
  template_hw: tuple[int, int] = (64, 64)

  def variable_shapes(self, name: str, num_classes: int) -> dict:
    """Shapes/dtypes of a model's variables, computing nothing (cached: tracing a
    large model takes seconds and every load needs its template)."""
    if name not in self.variants:
      raise errors.ConfigError(f'model {name!r} is not of family {self.name!r} ({sorted(self.variants)})')
    return _variable_shapes(self.name, name, int(num_classes))


@functools.lru_cache(maxsize=32)
def _variable_shapes(family: str, name: str, num_classes: int) -> dict:
  model = build_model(name, num_classes)
  x = jnp.zeros((1, *_FAMILIES[family].template_hw, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))


_FAMILIES: dict[str, ModelFamily] = {}
_MODELS: dict[str, ModelFamily] = {}


def register(family: ModelFamily, replace: bool = False) -> ModelFamily:
  """Make `family`'s model names available to `build_model` and the loaders."""
  missing = [f for f in RECIPE_FIELDS if f not in family.recipe]
  if missing:
    raise ValueError(f'model family {family.name!r}: its recipe names no {missing} (needed: {RECIPE_FIELDS})')
  if not replace:
    taken = [n for n in family.variants if n in _MODELS and _MODELS[n].name != family.name]
    if family.name in _FAMILIES or taken:
      raise ValueError(f'model family {family.name!r} or model names {taken} are already registered')
  old = _FAMILIES.pop(family.name, None)
  if old is not None:
    for n in old.variants:
      _MODELS.pop(n, None)
  _variable_shapes.cache_clear()
  _FAMILIES[family.name] = family
  for n in family.variants:
    _MODELS[n] = family
  return family


def unregister(name: str):
  """Remove a family (tests that register a toy family clean up with this)."""
  _variable_shapes.cache_clear()
  family = _FAMILIES.pop(name)
  for n in family.variants:
    _MODELS.pop(n, None)


def families() -> list[ModelFamily]:
  return list(_FAMILIES.values())


def model_names() -> list[str]:
  return sorted(_MODELS)


def family_of(name: str) -> ModelFamily:
  """The family of a registered model name."""
  if name not in _MODELS:
    raise errors.ConfigError(f'unknown model {name!r}; registered models: {", ".join(sorted(_MODELS))}')
  return _MODELS[name]


def resolve(name_or_variant: str, family: Optional[str] = None) -> str:
  """A registered model name from itself or from its short form within one
  family ('t' -> 'cgrseg_t'; 'tiny' -> 'cgrseg_tiny' with family='cgrseg');
  ambiguous or unknown short forms are errors."""
  if name_or_variant in _MODELS:
    return name_or_variant
  if family is not None and f'{family}_{name_or_variant}' in _MODELS:
    return f'{family}_{name_or_variant}'
  matches = [n for n, f in _MODELS.items() if n == f'{f.name}_{name_or_variant}']
  if len(matches) != 1:
    raise errors.ConfigError(
      f'model {name_or_variant!r}: {"ambiguous, one of " + str(matches) if matches else "unknown"}; '
      f'registered models: {", ".join(sorted(_MODELS))}'
    )
  return matches[0]


def build_model(name: str, num_classes: int, *, dtype=jnp.float32, platform=None, **overrides) -> nn.Module:
  """The model `name` (e.g. 'cgrseg_t') with `num_classes` outputs; `overrides`
  go to the family's build function (e.g. drop_path_rate=0.1). `platform`: the
  platform it is compiled for ('cpu', 'gpu', 'tpu'; None: this process's devices),
  for the families whose layers differ per backend (`build` takes `platform`)."""
  family = family_of(name)
  return family.build(num_classes=num_classes, dtype=dtype, platform=platform, **{**family.variants[name], **overrides})


def init_variables(model: nn.Module, rng: jax.Array, x) -> dict:
  """`model.init(rng, x)` (random variables of a fresh model), compiled without XLA's
  backend optimisation: the program runs once, so optimising it only costs compile time
  (the tiny CGRSeg on a 2-core CPU: 27 s -> 11 s). The initialisers' floats may differ
  from an optimised build in the last bit (fused multiply-adds); every fresh run uses this."""
  lowered = jax.jit(model.init).lower(rng, x)
  return lowered.compile(compiler_options={'xla_backend_optimization_level': 0})(rng, x)


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build_from_config(config, platform=None) -> nn.Module:
  """The model `config.model` names (`name`, `num_classes`, and the family's
  `build_options` that are set, e.g. `drop_path_rate`), computing in
  `config.precision`. A model field set for a family that has no such option is
  an error (only `depthwise`, a speed switch, is not: its 'auto' suits every family)."""
  if config.precision not in DTYPES:
    raise errors.ConfigError(f'config.precision={config.precision!r}; expected one of {sorted(DTYPES)}')
  family = family_of(config.model.name)
  stray = [
    k
    for k, v in config.model.items()
    if v is not None and k not in ('name', 'num_classes', 'depthwise', *family.build_options)
  ]
  if stray:
    raise errors.ConfigError(
      f'config.model.{stray[0]}={config.model[stray[0]]!r}: model family {family.name!r} has no such option '
      f'(it takes {", ".join(family.build_options) or "none"})'
    )
  overrides = {}
  for key in family.build_options:
    if config.model.get(key) is not None:
      overrides[key] = config.model[key]
  return build_model(
    config.model.name, config.model.num_classes, dtype=DTYPES[config.precision], platform=platform, **overrides
  )


def param_names(params: Any, name: str) -> Any:
  """A pytree like `params` whose leaves are the upstream (PyTorch) parameter
  names of model `name`, the names optimizer rules such as mmcv's
  `custom_keys` match against."""
  layout = family_of(name).key_layout
  return jax.tree_util.tree_map_with_path(
    lambda path, _: layout.torch_key('params', tuple(k.key for k in path)), params
  )


def recipe_value(config, field: str) -> Any:
  """A recipe piece (one of `RECIPE_FIELDS`): the config's choice if set, else
  the model family's."""
  section = config
  *parents, leaf = field.split('.')
  for p in parents:
    section = section.get(p) if section is not None else None
  value = section.get(leaf) if section is not None else None
  if value is not None:
    return value
  return family_of(config.model.name).recipe[field]
