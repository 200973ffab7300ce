"""Where things are, for the tests in any subfolder (importable as `paths`)."""

import os

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
SCRIPTS = os.path.join(REPO, 'scripts')
SHARED = os.path.join(os.path.dirname(REPO), 'shared')
