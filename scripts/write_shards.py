"""Write the dataset a config reads as ArrayRecord shards (local or gs://), for pods.

  python scripts/write_shards.py --config=configs/ade20k_t.py --output=gs://bucket/ade20k --num_shards=64
  python scripts/write_shards.py --config=configs/custom_example.py --output=data/mine_shards --num_shards=8

Every registered dataset works, custom data and the synthetic one included:
the samples are those `main.py` would read from `config.data.root` for
`data.train_split` and `data.val_split`. Train from them with
`--config.data.shards=<output>` (same samples, same order, same batches for
the same seed). Each split gets `<output>/<split>/` with its shards and
`manifest.json` (count, classes, SHA-256 of each shard, sample sizes).
"""

import sys

from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from cgrseg_jax import errors
from cgrseg_jax.data import input_pipeline

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'The training config whose dataset is written.', lock_config=True)
flags.DEFINE_string('output', None, 'Folder for the shards, local or gs://.', required=True)
flags.DEFINE_integer('num_shards', 16, 'Shards per split (a few hundred MB each suits GCS).')
flags.DEFINE_list('splits', ['train', 'val'], "Which of the config's splits: train (data.train_split), val.")


def main(argv):
  del argv
  try:
    bars = {}

    def progress(split, total, n):
      if split not in bars:
        bars[split] = tqdm(total=total, desc=f'{split} -> shards', unit='img', file=sys.stderr)
      bars[split].update(n)

    written = input_pipeline.write_shards(FLAGS.config, FLAGS.output, FLAGS.num_shards, tuple(FLAGS.splits), progress)
    for bar in bars.values():
      bar.close()
  except errors.UserError as e:
    print(f'error ({type(e).__name__}): {e}', file=sys.stderr)
    sys.exit(2)
  for split, m in written.items():
    print(f'{FLAGS.output}/{split}: {m["count"]} samples of {m["dataset"]} in {len(m["shards"])} shards')
  print(f'train from them with --config.data.shards={FLAGS.output}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
