"""The small programs some scenarios measure from outside, in child processes of their
own: a cold open, a serving process, a reader under a memory limit, the TensorFlow
worker. A child program gets its parameters as one JSON argument and answers with one
JSON line, the last on its stdout (tools/bench_suite.py --_child S2.ltm '{...}')."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from typing import Any, Callable, Iterator

from benchsuite.host import ROOT

SUITE = ROOT / "tools" / "bench_suite.py"


def child_argv(program: str, **params: Any) -> list[str]:
    """The command line of child program ``program`` ("S2.ltm": CHILDREN["ltm"] of S2)."""
    return [sys.executable, str(SUITE), "--_child", program, json.dumps(params)]


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def last_json(proc: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{what} exited {proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_json(program: str, timeout: float = 600, **params: Any) -> dict[str, Any]:
    """Run a child program to its end and return its JSON line."""
    proc = subprocess.run(child_argv(program, **params), capture_output=True, text=True,
                          timeout=timeout)
    return last_json(proc, f"child {program}")


class Worker:
    """A child program kept alive across repeats, answering one JSON command per line
    (the TensorFlow worker: importing TF takes seconds, and a restore into a process
    that has restored before is what a serving process does)."""

    def __init__(self, program: str, **params: Any) -> None:
        self.proc = subprocess.Popen(child_argv(program, **params), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith("{"):  # a library may print to stdout too
                return json.loads(line)
        raise RuntimeError(f"worker {self.proc.args[3]} exited ({self.proc.wait()})")

    def ask(self, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self._read()

    def close(self) -> None:
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serve_commands(handle: Callable[[dict[str, Any]], dict[str, Any]], **hello: Any) -> int:
    """Child side of Worker: say hello, then answer every command line until stdin ends."""
    emit({"ready": True, **hello})
    for line in sys.stdin:
        emit(handle(json.loads(line)))
    return 0


def release(procs: list[subprocess.Popen], timeout: float = 30) -> None:
    """Tell children that wait on stdin to exit (a newline), killing any that do not."""
    for p in procs:
        try:
            p.communicate("\n", timeout=timeout)
        except (BrokenPipeError, ValueError, subprocess.TimeoutExpired):
            p.kill()
            p.wait()


@contextlib.contextmanager
def ready_children(argv: list[str], n: int, what: str, env: dict[str, str] | None = None,
                   timeout: float = 30) -> Iterator[tuple[list[subprocess.Popen],
                                                          list[dict[str, Any]]]]:
    """``n`` children of ``argv`` that each print one JSON line when ready, then wait on
    stdin: (the processes, their ready lines) once all are ready; released on exit."""
    procs = [subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(n)]
    try:
        ready = []
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"a {what} process exited ({p.wait()})")
            ready.append(json.loads(line))
        yield procs, ready
    finally:
        release(procs, timeout)
