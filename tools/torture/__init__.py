"""The torture suite: crash, power-loss, fault, damage, fuzz, race and hostile-store tests.

    python -m tools.torture short            # what CI runs (also: pytest -m torture_short)
    python -m tools.torture long --minutes 60 --json torture.json
    python -m tools.torture t2 --states 2000 # one test, with its own knobs

T1 crashpoints (kill -9 at every seam operation), T2 powerloss (unsynced writes kept,
dropped or garbled), T3 faults (EIO, ENOSPC, short writes, a full tmpfs), T4 damage (bit
flips, cuts, zeroed ranges in every file type), T5 fuzz (every decoder), T6 readers
(readers racing a writer that is killed), T7 hostile (symlinks, huge counts, huge files).
Each has negative controls (``controls``). docs/RELIABILITY.md says what each promise
is, how it is tested, and the figures of the last long run.
"""
