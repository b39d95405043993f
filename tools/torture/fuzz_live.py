"""atheris target: the live file decoder (embstore.format.unpack_live).

    python tools/torture/fuzz_live.py -max_total_time=600 [corpus_dir]   # atheris
    python tools/torture/fuzz_live.py --plain 100000                     # without it

The contract an input must keep is ``fuzzing.one_input`` (typed errors only, spec
invariants after a successful decode); an input that breaks it is a crash for atheris.
"""

import sys
from pathlib import Path

if __package__:
    from .fuzzing import main
else:  # run as a file: the package is tools/torture
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from torture.fuzzing import main

if __name__ == "__main__":
    sys.exit(main("live", sys.argv))
