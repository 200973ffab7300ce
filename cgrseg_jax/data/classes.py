"""Class names and colour palettes of the supported datasets.

The name lists follow mmsegmentation 0.27's dataset classes (same order, so
class index ``i`` here is train id ``i`` there). Palettes are RGB ``uint8``
arrays of shape ``(num_classes, 3)``. Cityscapes has a published standard
palette; for the other datasets a deterministic palette is generated with the
PASCAL VOC bit-interleaving colour map, which gives distinct, reproducible
colours for any class count (the exact upstream colours only matter for
visualisation, never for training or metrics).
"""

from __future__ import annotations

import numpy as np

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed",
    "windowpane", "grass", "cabinet", "sidewalk", "person", "earth", "door",
    "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill",
    "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall",
    "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
    "flag",
)

_COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "stop sign",
    "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
_COCO_STUFF = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush",
    "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile",
    "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof",
    "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table",
    "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other",
    "wood",
)
COCO_STUFF_CLASSES = _COCO_THINGS + _COCO_STUFF

PASCAL_CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird",
    "boat", "book", "bottle", "building", "bus", "cabinet", "car", "cat",
    "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate",
    "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk",
    "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
    "tvmonitor", "wall", "water", "window", "wood",
)

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)

# The standard Cityscapes train-id colours (RGB).
CITYSCAPES_PALETTE = np.array(
    [
        [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156],
        [190, 153, 153], [153, 153, 153], [250, 170, 30], [220, 220, 0],
        [107, 142, 35], [152, 251, 152], [70, 130, 180], [220, 20, 60],
        [255, 0, 0], [0, 0, 142], [0, 0, 70], [0, 60, 100], [0, 80, 100],
        [0, 0, 230], [119, 11, 32],
    ],
    dtype=np.uint8,
)

# Synthetic scenes: class 0 is the textured background, the others are shape
# families (see synthetic.py); names are generic because the count is
# configurable.
def synthetic_classes(num_classes: int) -> tuple[str, ...]:
    if num_classes < 2:
        raise ValueError(f"synthetic data needs >= 2 classes, got {num_classes}")
    return ("background",) + tuple(f"shape_{i}" for i in range(1, num_classes))


def voc_colormap(num_classes: int) -> np.ndarray:
    """PASCAL VOC colour map: class bits spread over the high bits of R, G, B.

    Deterministic and distinct for up to 256 classes; index 0 is black.
    """
    if not 0 < num_classes <= 256:
        raise ValueError(f"num_classes must be in [1, 256], got {num_classes}")
    idx = np.arange(num_classes)
    cmap = np.zeros((num_classes, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            cmap[:, channel] |= ((idx >> (3 * bit + channel)) & 1) << (7 - bit)
    return cmap.astype(np.uint8)


def _generated_palette(num_classes: int) -> np.ndarray:
    # Skip VOC's black entry so no class is drawn like the (black) padding.
    return voc_colormap(num_classes + 1)[1:]


def class_names(dataset: str, num_classes: int | None = None) -> tuple[str, ...]:
    """Class names of a named dataset (see ``DATASETS`` in sources.py)."""
    key = dataset.lower()
    if key in ("ade20k", "tfds_ade20k", "scene_parse150"):
        return ADE20K_CLASSES
    if key in ("coco_stuff10k", "coco_stuff164k", "coco_stuff"):
        return COCO_STUFF_CLASSES
    if key in ("pascal_context59", "pascal_context"):
        return PASCAL_CONTEXT59_CLASSES
    if key == "cityscapes":
        return CITYSCAPES_CLASSES
    if key == "synthetic":
        return synthetic_classes(num_classes if num_classes is not None else 8)
    raise KeyError(f"unknown dataset {dataset!r}; no class names registered")


def palette(dataset: str, num_classes: int | None = None) -> np.ndarray:
    """RGB palette ``(num_classes, 3) uint8`` of a named dataset."""
    if dataset.lower() == "cityscapes":
        return CITYSCAPES_PALETTE.copy()
    return _generated_palette(len(class_names(dataset, num_classes)))
