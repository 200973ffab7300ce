"""mmcv 1.x operations restated for the tests (not a test file)."""

import cv2
import numpy as np

# mmseg 0.27's img_norm_cfg, as its configs write it (RGB).
MMSEG_MEAN = (123.675, 116.28, 103.53)
MMSEG_STD = (58.395, 57.12, 57.375)


def imnormalize(image_bgr, mean=MMSEG_MEAN, std=MMSEG_STD):
  """The OpenCV calls of mmcv 1.x ``imnormalize`` with ``to_rgb=True``:
  float32 copy, BGR->RGB, cv2.subtract / cv2.multiply with float64 (1, 3)
  arrays of the mean and of 1 / std."""
  img = image_bgr.astype(np.float32)
  mean = np.asarray(mean, np.float64).reshape(1, -1)
  inv = 1.0 / np.asarray(std, np.float64).reshape(1, -1)
  img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
  cv2.subtract(img, mean, img)
  cv2.multiply(img, inv, img)
  return img
