"""kill -9 at random moments, with injected I/O faults and damaged logs (the first torture
run; the crash-point sweep of every seam operation is ``crashpoints``).

    python -m tools.torture random-kills --minutes 5      # faults and damage on
    python -m tools.torture random-kills --trials 2000 --seed 7 --json out.json
    python -m tools.torture random-kills --trials 200 --faults 0 --damage 0   # kill -9 only

One store is reused for every trial. A trial starts a writer process (pre-spawned, so its
imports overlap the previous trial), which opens the store (recovering whatever the last
one left), then runs a deterministic sequence of operations and prints each operation's
number after the call returns (acknowledged). The driver kills it with SIGKILL at a random
moment: during recovery in some trials, mid-run in the rest. Then (most trials) the driver
reopens the store itself and checks it against a numpy model:

* every acknowledged operation is present; the one in flight is present or absent as a
  whole (each operation is one commit, so one log record);
* no row is torn: every row is self-validating (element j = stamp + j/8, exact in float32);
* the key index is one-to-one onto rows 0..n-1 and ``num_rows`` matches it;
* the optimizer step counter equals the number of SGD operations applied;
* ``store.check() == []``.

Operation n (seeded by (seed, n)) is, by n % 3: 0 = ``update`` of 64 random rows (with
duplicates) of dense table "d" to stamp n + 1; 1 = ``apply_gradients`` with SGD(1.0) on dense
table "g" with integer gradients (exact sums); 2 = ``update`` of keyed table "k": 8 new
keys and 8 known ones, stamp n + 1.

Fault injection (``--faults P``): in that fraction of trials the writer's log I/O fails
once (EIO or ENOSPC on write, EIO on fdatasync, ENOSPC on segment preallocation) at a
random call. The failing commit must raise DurabilityError, and so must the next one; the
writer then closes or just exits; reopening must recover every acknowledged operation.

Damaged files (``--damage P``): in that fraction of kill trials the crashed image is
copied and its log damaged: truncated at a random offset, or one byte flipped. Reopening
the copy must either raise a FormatError (CorruptLogError for a damaged record followed
by valid ones) or give a consistent store. Where only unacknowledged bytes were damaged
(cut or flip past the last committed record, flip in padding) the result must be exact;
where acknowledged records were cut, it holds a prefix of the operations (rows written
by the lost records may keep their newer values: the shards were written after logging,
and a redo log cannot undo them; no row is torn, the index stays one-to-one).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import multiprocessing
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import embstore
from embstore.errors import DurabilityError, FormatError
from embstore.faultyfs import FaultyFileSystem
from embstore.log import HDR, WriteAheadLog

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT, ROOT / "tools"):  # the fork server imports this module by name
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
from .workload import (  # noqa: E402
    Allowed,
    Model,
    create_store,
    do_op,
    is_applied,
    model_at,
    verify,
)


# --- the writer process ---------------------------------------------------------------------


def worker(path: str, seed: int, ack: int, fault: tuple[str, int, int], conn: Any) -> None:
    """The writer: open (recover), resume after the last applied operation, run until
    killed. Every message is one small pipe write, so it arrives whole or not at all."""
    def say(msg: str) -> None:
        conn.send_bytes(msg.encode())

    try:
        say("open")
        fs = FaultyFileSystem()
        store = embstore.open(path, "r+", fs=fs)
        start = ack + 1 if is_applied(store, seed, ack) else ack
        say(f"start {start}")
        if fault[0] != "-":  # the log's I/O fails once, at the nth call of one operation
            op, nth, err = fault
            fs.fail(op, nth, err, path=f"{path}/wal/*")
        n = start
        while True:
            try:
                do_op(store, seed, n)
            except DurabilityError as exc:
                say(f"fault {n} {exc.errno}")
                try:
                    do_op(store, seed, n + 1)
                    say("accepted-after-fault")
                except DurabilityError:
                    say("refused")
                if random.Random(seed * 7919 + n).random() < 0.5:
                    store.close()
                    say("closed")
                os._exit(0)
            say(str(n))  # only now is operation n acknowledged
            n += 1
    except BaseException:
        say("error " + traceback.format_exc())
        os._exit(1)


FAULT_KINDS = [("pwritev", errno.EIO), ("pwritev", errno.ENOSPC), ("fdatasync", errno.EIO),
               ("fallocate", errno.ENOSPC)]


# --- the driver -----------------------------------------------------------------------------


@dataclass
class Stats:
    trials: int = 0
    kills: int = 0
    kills_in_recovery: int = 0
    verified_opens: int = 0
    acknowledged_ops: int = 0       # operations acknowledged by writers, all trials
    verified_ops: int = 0           # applied operations checked against the model
    rows_checked: int = 0
    in_flight_present: int = 0
    in_flight_absent: int = 0
    faults_injected: int = 0
    faults_refused_after: int = 0
    faults_closed_cleanly: int = 0
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    damage: dict[str, int] = field(default_factory=dict)
    damage_ops_cut: int = 0         # acknowledged ops lost to cut log records, all trials
    seconds: float = 0.0

    def bump(self, key: str, table: str = "damage") -> None:
        counts = getattr(self, table)
        counts[key] = counts.get(key, 0) + 1


class Driver:
    def __init__(self, directory: Path, seed: int, log: Callable[[str], None]) -> None:
        self.dir, self.seed, self.log = directory, seed, log
        self.path = directory / "store"
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.model = Model(seed)  # state after the operations known to be applied
        self.ack = 0              # operations acknowledged (applied >= ack, <= ack + 1)
        self.exact = True         # applied == ack is known
        self.verified = self.model.copy()  # the model at the last checked reopen
        # How long opening (recovering) took in recent trials: a kill meant to land in
        # recovery is drawn within it, so the share that does stays the same however
        # fast recovery gets (a fixed 0-30 ms window missed more as recovery sped up).
        self.open_s: list[float] = [0.03]
        create_store(self.path)
        # Writers are forked from a fork server that has imported embstore already: a
        # fresh interpreter would spend ~0.35 s per trial importing numpy.
        self.ctx = multiprocessing.get_context("forkserver")
        # (The server does not see sys.path changes, so preload installed modules only.)
        # Under pytest each child also re-runs pytest's __main__, so preload pytest too.
        self.ctx.set_forkserver_preload(
            ["numpy", "lmdb", "embstore", "embstore.keys", "embstore.optim", "embstore.log",
             "embstore.writer"] + [m for m in ("pytest",) if m in sys.modules])

    def _start(self, ack: int, fault: tuple[str, int, int]) -> tuple[Any, Any]:
        mine, theirs = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=worker, args=(str(self.path), self.seed, ack, fault,
                                                     theirs), daemon=True)
        proc.start()
        theirs.close()  # so that our end sees EOF when the writer dies
        return proc, mine

    def close(self) -> None:
        pass

    def trial(self, fault_rate: float, damage_rate: float, verify_rate: float) -> None:
        st, rng = self.stats, self.rng
        st.trials += 1
        fault: tuple[str, int, int] = ("-", 0, 0)
        if rng.random() < fault_rate:
            op, err = rng.choice(FAULT_KINDS)
            fault = (op, rng.randint(1, 1 if op == "fallocate" else 40), err)
        in_recovery = fault[0] == "-" and rng.random() < 0.15
        lines = self._run(*self._start(self.ack, fault), in_recovery, fault[0] != "-")
        start = next((int(x.split()[1]) for x in lines if x.startswith("start ")), None)
        done = [int(x) for x in lines if x.isdigit()]
        faulted = [x for x in lines if x.startswith("fault ")]
        if start is not None:
            if start not in ((self.ack,) if self.exact else (self.ack, self.ack + 1)):
                raise AssertionError(f"writer resumed at op {start}; acknowledged {self.ack}, "
                                     f"exact={self.exact}")
            if start == self.ack + 1:
                self.model.step()
            self.ack, self.exact = start, True
        if done:
            if done != list(range(self.ack, self.ack + len(done))):
                raise AssertionError(f"acknowledgements out of order: {done[:5]}...")
            for _ in done:
                self.model.step()
            self.ack += len(done)
            self.exact = False
            st.acknowledged_ops += len(done)
        if start is not None and not done:
            self.exact = False  # the first operation may be in flight
        if faulted:
            st.faults_injected += 1
            st.bump(f"{fault[0]} {errno.errorcode[fault[2]]}", "faults_by_kind")
            st.faults_refused_after += "refused" in lines
            st.faults_closed_cleanly += "closed" in lines
            if "accepted-after-fault" in lines:
                raise AssertionError("a commit was accepted after a failed log write")
        crashed, base = None, self.verified
        if not faulted and rng.random() < damage_rate:
            crashed = self.dir / "crashed"
            shutil.rmtree(crashed, ignore_errors=True)
            shutil.copytree(self.path, crashed)
        if faulted or crashed is not None or rng.random() < verify_rate:
            self.verify_open()
        if crashed is not None:
            self.damage(crashed, base)

    def _run(self, proc: Any, conn: Any, in_recovery: bool, faulty: bool) -> list[str]:
        """Collect messages until the kill moment, SIGKILL, return every message."""
        lines: list[str] = []
        deadline = None
        limit = time.monotonic() + 30
        eof = False
        opened_at = None
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if not conn.poll(max(0.0, min(deadline or limit, limit) - now)):
                if deadline is None:
                    proc.kill()
                    raise AssertionError("writer made no progress for 30 s")
                break
            try:
                x = conn.recv_bytes().decode()
            except EOFError:
                eof = True  # exited by itself (after an injected fault, or it failed)
                break
            lines.append(x)
            if x.startswith("fault "):
                deadline = time.monotonic() + 20  # let it finish: it exits by itself
            elif x == "open":
                opened_at = time.monotonic()
                if deadline is None and in_recovery:
                    typical = sorted(self.open_s)[len(self.open_s) // 2]
                    deadline = opened_at + self.rng.uniform(0, typical)
            elif x.startswith("start") and opened_at is not None:
                self.open_s = self.open_s[-15:] + [time.monotonic() - opened_at]
                if deadline is None:
                    deadline = time.monotonic() + self.rng.uniform(0, 1.0 if faulty else 0.25)
                deadline = time.monotonic() + self.rng.uniform(0, 1.0 if faulty else 0.25)
        if not eof:
            proc.kill()  # SIGKILL
            self.stats.kills += 1
            if not any(x.startswith("start") for x in lines):
                self.stats.kills_in_recovery += 1
        proc.join()
        try:  # messages written before the kill are still in the pipe
            while conn.poll(0):
                lines.append(conn.recv_bytes().decode())
        except EOFError:
            pass
        conn.close()
        errors = [x for x in lines if x.startswith("error ")]
        if errors:
            raise AssertionError(f"writer failed:\n{errors[0]}")
        return lines

    def verify_open(self) -> None:
        st = self.stats
        with embstore.open(self.path, "r+") as store:
            if not self.exact and is_applied(store, self.seed, self.ack):
                self.model.step()
                self.ack += 1
                st.in_flight_present += 1
            elif not self.exact:
                st.in_flight_absent += 1
            self.exact = True
            st.rows_checked += verify(store, self.model)
        self.verified = self.model.copy()  # its close checkpoints: later crashes start here
        st.verified_opens += 1
        st.verified_ops = self.model.applied

    # --- damaged logs ---------------------------------------------------------------------

    def damage(self, crashed: Path, base: Model) -> None:
        """Damage the log of a crashed image whose recovery gives self.model exactly.
        ``base`` is a model no newer than the image's checkpoint."""
        applied = self.model.applied
        with embstore.open(crashed, "r") as ro:
            ckpt = ro.checkpoint_lsn
        wal = WriteAheadLog.open(crashed / "wal", start_lsn=ckpt, readonly=True)
        try:
            frames = [(lsn, len(p)) for lsn, p in wal.replay(ckpt)]
            end, segs = wal.end_lsn, wal.segments
        finally:
            wal.close()
        covered = applied - len(frames)  # operations in the shards at the checkpoint
        seg_start, seg_path = segs[-1]
        size = os.path.getsize(seg_path)
        data_end = HDR + end - seg_start
        how = self.rng.choice(["truncate", "flip"])
        if how == "truncate":
            cut = self.rng.randint(0, min(size, data_end + 256))
            with open(seg_path, "r+b") as f:
                f.truncate(cut)
            at = seg_start + cut - HDR
        else:
            lo = HDR + max(0, ckpt - seg_start)
            off = self.rng.randint(lo, max(lo, min(size - 1, data_end + 256)))
            with open(seg_path, "r+b") as f:
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([(b[0] if b else 0) ^ (1 << self.rng.randint(0, 7))]))
            at = seg_start + off - HDR
        # What recovery must give: records wholly before the damage survive.
        hit = next((i for i, (lsn, n) in enumerate(frames) if lsn <= at < lsn + 32 + n), None)
        in_padding = hit is None and any(lsn + 32 + n <= at < lsn + 32 + n + (-n) % 8
                                         for lsn, n in frames)
        if how == "truncate":
            keep = sum(1 for lsn, n in frames if lsn + 32 + n + (-n) % 8 <= at
                       or lsn + 32 + n <= at)
            expect = "refuse" if at < ckpt or cut < HDR else covered + keep
        elif at >= end or in_padding:
            expect = applied
        elif hit is not None and hit == len(frames) - 1:
            expect = applied - 1  # the newest record: indistinguishable from a torn write
        else:
            expect = "refuse"
        try:
            store = embstore.open(crashed, "r+")
        except FormatError as exc:
            self.stats.bump(f"{how}: refused ({type(exc).__name__})")
            if expect != "refuse":
                raise AssertionError(f"{how} at LSN {at}: open raised {exc!r}, expected "
                                     f"{expect} operations") from exc
            return
        try:
            got = covered + store._writer.recovered_records
            if expect == "refuse" or got != expect:
                raise AssertionError(f"{how} at LSN {at} (checkpoint {ckpt}, end {end}): "
                                     f"recovered {got} operations, expected {expect}")
            if got == applied:
                verify(store, self.model)
                self.stats.bump(f"{how}: exact")
            else:
                m = model_at(base, got)
                verify(store, m, Allowed(m, applied))
                self.stats.bump(f"{how}: acknowledged ops cut, consistent")
                self.stats.damage_ops_cut += applied - got
        finally:
            store.close()
            shutil.rmtree(crashed, ignore_errors=True)


def run(directory: Path, *, trials: int | None = None, minutes: float | None = None,
        seed: int = 0, faults: float = 0.1, damage: float = 0.1, verify_rate: float = 0.7,
        log: Callable[[str], None] = lambda s: None) -> Stats:
    """Run trials until both limits given are reached (one of them must be)."""
    if trials is None and minutes is None:
        raise ValueError("give trials or minutes")
    t0 = time.monotonic()
    driver = Driver(directory, seed, log)
    try:
        while True:
            elapsed = time.monotonic() - t0
            if (trials is None or driver.stats.trials >= trials) and (
                    minutes is None or elapsed >= minutes * 60):
                break
            driver.trial(faults, damage, verify_rate)
            if driver.stats.trials % 100 == 0:
                s = driver.stats
                log(f"{s.trials} trials, {s.kills} kills, {s.acknowledged_ops} acked ops, "
                    f"{s.faults_injected} faults, {elapsed:.0f} s")
        driver.verify_open()  # the last word: everything acknowledged is there
    finally:
        driver.close()
    driver.stats.seconds = time.monotonic() - t0
    return driver.stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int)
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", type=float, default=0.1, help="fraction of fault trials")
    ap.add_argument("--damage", type=float, default=0.1, help="fraction of damage trials")
    ap.add_argument("--verify", type=float, default=0.7, help="fraction of verified trials")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if args.trials is None and args.minutes is None:
        args.trials = 2000
    tmp = None if args.dir else tempfile.mkdtemp(prefix="embstore-torture-")
    directory = Path(args.dir or tmp)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        stats = run(directory, trials=args.trials, minutes=args.minutes, seed=args.seed,
                    faults=args.faults, damage=args.damage, verify_rate=args.verify,
                    log=lambda s: print(s, flush=True))
    except AssertionError as exc:
        traceback.print_exc()
        print(f"FAILED (seed {args.seed}, store kept in {directory}): {exc}", file=sys.stderr)
        return 1
    figures = {**stats.__dict__, "seed": args.seed, "cpus": os.cpu_count()}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
