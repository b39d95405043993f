"""atheris target for one decoder of the on-disk formats (``fuzzing.DECODERS``: live,
manifest, shard_header, keys_header, key_records, log_segment_header, log_frames,
log_payload); the decoder's name comes first, then libFuzzer's flags and corpus:

    python tools/torture/fuzz_target.py live -max_total_time=600 [corpus_dir]   # atheris
    python tools/torture/fuzz_target.py live --plain 100000                     # without it

The contract an input must keep is ``fuzzing.one_input`` (typed errors only, spec
invariants after a successful decode); an input that breaks it is a crash for atheris.
"""

import sys
from pathlib import Path

if __package__:
    from .fuzzing import DECODERS, main
else:  # run as a file: the package is tools/torture
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from torture.fuzzing import DECODERS, main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in DECODERS:
        sys.exit(f"usage: {sys.argv[0]} DECODER [libFuzzer flags]; DECODER is one of "
                 f"{', '.join(sorted(DECODERS))}")
    # libFuzzer reads argv too: it gets every argument but the decoder's name
    sys.exit(main(sys.argv[1], sys.argv[:1] + sys.argv[2:]))
