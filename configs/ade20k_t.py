"""CGRSeg-T on ADE20K, 160k iterations, batch 16, crop 512 (upstream
local_configs/cgrseg/cgrseg-t_ade20k_160k.py). Set `--config.data.root`, and
`--config.init=eformer_s1_450.pth` to start from the ImageNet backbone as upstream."""

from configs import default


def get_config():
  c = default.get_config()
  c.model.name = 'cgrseg_t'
  return c
