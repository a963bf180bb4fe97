import os
import sys

# `python -m hardener` puts the current directory first on the import path; harden imports nothing from
# it (a stray torch.py or safetensors.py there would run): drop that entry (an explicit PYTHONPATH stays).
if sys.path and (sys.path[0] in ("", ".") or os.path.realpath(sys.path[0]) == os.path.realpath(os.getcwd())):
    del sys.path[0]

from hardener.cli.signals import held  # noqa: E402

try:
    with held():  # Ctrl-C or SIGTERM while Python loads the command line: one line, exit 130
        from hardener.cli.app import run
except KeyboardInterrupt:
    sys.stderr.write("Error: interrupted\n")
    sys.exit(130)
run()
