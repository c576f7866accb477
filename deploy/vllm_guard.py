"""The parent-death guard between loraloop and the embedded vLLM: a tiny process that starts the
server as its child and ends the server's whole process tree (API server, engine core, resource
tracker) when loraloop dies, however it dies (SIGKILL, OOM kill, `docker kill`), when it is told to
stop (SIGTERM), or when the server itself exits.

Standard library only: it runs by path (`python -I -S vllm_guard.py`) under any interpreter, so it
knows nothing of loraloop's packages, settings or vLLM's flags. Linux gives it the strongest
guarantees (child subreaper, parent-death signal on the server); elsewhere the lifeline still works.

    python vllm_guard.py --lifeline FD --report FD [--grace S] -- CMD [ARG...]

`--lifeline FD`: the read end of a pipe whose only write end loraloop holds; EOF means loraloop is
gone (the kernel closes a dead process's descriptors, whichever thread spawned the guard).
`--report FD`: the guard writes the server's pid there, one line, then closes it.
Exit status: the server's (128 + signal number when a signal ended it).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.25
PARENT_DEATH_GRACE_S = 3.0  # nobody will use the server any more: a short grace, then SIGKILL


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _server_dies_with_guard() -> None:
    """preexec_fn of the server (the guard is single-threaded, so the parent-death signal, which
    Linux ties to the thread that forked, fires exactly when the guard exits)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, pgrp) of a live, non-zombie process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":
        return None
    return int(fields[1]), int(fields[2])


def descendants(root: int) -> set[int]:
    """Every live process below `root`: its process group (children that did not leave it) and its
    child tree (orphans of the server are re-parented to the guard, a child subreaper)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return set()
    table = {}
    for name in names:
        if name.isdigit() and int(name) != root:
            stat = _stat(int(name))
            if stat is not None:
                table[int(name)] = stat
    found = {pid for pid, (_ppid, pgrp) in table.items() if pgrp == root}
    parents = {root} | found
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _pgrp) in table.items():
            if ppid in parents and pid not in parents:
                parents.add(pid)
                found.add(pid)
                grew = True
    return found


def _signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_tree(server: subprocess.Popen[bytes], *, grace_s: float) -> None:
    """SIGTERM to every descendant, up to `grace_s` for them to go, then SIGKILL to what is left."""
    me = os.getpid()
    _signal_all(descendants(me) | ({server.pid} if server.poll() is None else set()), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if server.poll() is not None and not descendants(me):
            return
        time.sleep(0.05)
    for _ in range(3):  # a process may fork while it is being killed: repeat until none is left
        left = descendants(me)
        if server.poll() is None:
            left.add(server.pid)
        if not left:
            break
        _signal_all(left, signal.SIGKILL)
        time.sleep(0.05)
    server.wait()  # orphans that became zombies here are reaped by init once the guard exits


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run(lifeline: int, report: int, grace_s: float, command: list[str]) -> int:
    parent = os.getppid()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    stop_requested: list[int] = []

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_stop)
    server = subprocess.Popen(command, preexec_fn=_server_dies_with_guard)  # noqa: PLW1509 - single thread
    os.write(report, f"{server.pid}\n".encode())
    os.close(report)
    while True:
        if stop_requested:
            end_tree(server, grace_s=grace_s)
            break
        if server.poll() is not None:
            end_tree(server, grace_s=min(grace_s, PARENT_DEATH_GRACE_S))  # the server's orphans
            break
        try:
            readable, _, _ = select.select([lifeline], [], [], POLL_S)
        except InterruptedError:
            continue
        parent_gone = os.getppid() != parent
        if readable and not os.read(lifeline, 64):
            parent_gone = True  # EOF: the only write end was closed, i.e. loraloop is gone
        if parent_gone:
            print(
                "loraloop guard: parent process gone, stopping the vLLM server", file=sys.stderr, flush=True
            )
            end_tree(server, grace_s=min(grace_s, PARENT_DEATH_GRACE_S))
            break
    return _exit_code(server.returncode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm_guard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lifeline", type=int, required=True)
    parser.add_argument("--report", type=int, required=True)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    return run(args.lifeline, args.report, args.grace, command)


if __name__ == "__main__":
    sys.exit(main())
