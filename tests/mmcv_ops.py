"""mmcv 1.x operations restated for the tests (not a test file)."""

import cv2
import numpy as np

# mmseg 0.27's img_norm_cfg, as its configs write it (RGB).
MMSEG_MEAN = (123.675, 116.28, 103.53)
MMSEG_STD = (58.395, 57.12, 57.375)


def imnormalize(image_bgr, mean=MMSEG_MEAN, std=MMSEG_STD):
  """The OpenCV calls of mmcv 1.x ``imnormalize`` with ``to_rgb=True``:
  float32 copy, BGR->RGB, cv2.subtract / cv2.multiply with float64 (1, 3)
  arrays of the mean and of 1 / std (``np.float64(mean)``, ``1 / np.float64(std)``)."""
  img = image_bgr.astype(np.float32)
  mean = np.float64(np.asarray(mean).reshape(1, -1))
  inv = 1 / np.float64(np.asarray(std).reshape(1, -1))
  img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
  cv2.subtract(img, mean, img)
  cv2.multiply(img, inv, img)
  return img


def normalize_transform(image_bgr, mean=MMSEG_MEAN, std=MMSEG_STD):
  """mmseg 0.27's ``Normalize(mean, std, to_rgb=True)`` transform: its
  ``__init__`` stores ``np.array(mean, dtype=np.float32)`` (and std), and
  ``__call__`` passes those to ``imnormalize``."""
  return imnormalize(image_bgr, np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32))
