"""main.py as users call it: --workdir defaults to runs/<config name> (mmseg's work_dirs/<config>)."""

import main


def test_default_workdir_is_runs_config_stem():
  assert main.default_workdir('configs/ade20k_t.py') == 'runs/ade20k_t'
  assert main.default_workdir('/abs/path/configs/synthetic_t.py') == 'runs/synthetic_t'
  # ml_collections' "file:override" form names the same file
  assert main.default_workdir('configs/cityscapes_t.py:tiny') == 'runs/cityscapes_t'
