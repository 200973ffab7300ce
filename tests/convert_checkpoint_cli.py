"""scripts/convert_checkpoint.py as a module for the tests."""

import script_modules

main = script_modules.load('convert_checkpoint').main
