"""Run untrusted Python (a model's code answer) against tests in a locked-down subprocess.

Notable, layered so that one failing wall does not open the sandbox:
- ``python -I`` (no user site, no PYTHON* env, no script dir on sys.path), a stripped environment, and a
  throwaway temporary directory as the working directory, deleted afterwards.
- Kernel limits set in the child before the code runs: RLIMIT_CPU (busy loops), RLIMIT_AS (memory
  hogs), RLIMIT_FSIZE (disk and output floods), RLIMIT_NPROC = 0 (fork bombs, thread bombs),
  RLIMIT_CORE = 0. RLIMIT_NPROC does not bind root, so a root parent drops the child to ``nobody``
  (when ``nobody`` can read the interpreter; otherwise the audit hook is what stops forks).
- No network: a fresh network namespace (``unshare --net``) when the kernel allows it, and always a
  PEP 578 audit hook that refuses sockets, process creation (fork/exec/spawn/subprocess/system),
  signals to other processes, ctypes, and writes/deletes outside the working directory. (An audit hook
  alone is not a security boundary, hence the namespaces and limits.)
- A wall-clock timeout kills the whole process group (``start_new_session``), so children and
  sleeping code die too; stdout/stderr go to files capped by RLIMIT_FSIZE, never to parent memory.
  ``run_tests`` also caps a program's stdin/stdout cases together (``total_timeout``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

NOBODY = 65534

# The trusted prologue, run with `python -I -c`.
# argv: code path, memory bytes (0: none), cpu s, fsize bytes, drop to nobody (0/1), tests path ("" = none),
# modules to import before the limits and the hook (comma-separated, "" = none), runs (0: the code once, in
# this process; n: n forks, see _zygote), a run's wall clock in seconds and how many run at a time (with runs).
# With tests, stdin's first line is a nonce printed only after the tests ran to the end.
_RUNNER = r"""
import builtins, os, posixpath, resource, stat, sys, types

def _sealed(fn, env):
    # fn with private globals and builtins: the code can monkeypatch modules, builtins and __main__, not these
    new = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new

def _install(mem, cpu, fsize, drop):
    if mem:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    for lim, val in ((resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 0)):
        resource.setrlimit(lim, (val, val))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    if drop:
        os.setgroups([])
        os.setgid(NOBODY_UID)
        os.setuid(NOBODY_UID)
    private = {"__builtins__": dict(vars(builtins)), "os": types.SimpleNamespace(**vars(os)),
               "stat": types.SimpleNamespace(**vars(stat))}
    paths = {**vars(posixpath), **private}
    paths.update({k: _sealed(v, paths) for k, v in paths.items() if isinstance(v, types.FunctionType)})
    realpath, isdir = paths["realpath"], paths["isdir"]
    root = realpath(os.getcwd())
    blocked = {
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "_posixsubprocess.fork_exec",
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.sendto", "socket.sendmsg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
        "ctypes.addressof", "ctypes.cdata", "os.setuid", "os.chroot", "sys.remote_exec", "sys._getframe",
        "sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents",
    }
    # frames reach the runner's locals (the nonce): a traceback's, a generator's, a coroutine's
    frame_attrs = {"tb_frame", "gi_frame", "cr_frame", "ag_frame"}
    # also a ValueError, as where an interpreter has no frames: the stdlib's callers of sys._getframe
    # (collections.namedtuple, typing, enum, logging; so importing fractions, decimal, dataclasses,
    # statistics) catch it and go on without the frame
    class FrameRefused(PermissionError, ValueError):
        pass

    path_events = {"os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "os.chmod", "os.chown", "os.link",
                   "os.symlink", "os.truncate", "os.mkdir", "os.utime", "shutil.move", "shutil.copyfile",
                   "os.setxattr", "os.removexattr"}
    readlink = os.readlink
    fresh = frozenset({"_thread", "posix", "_signal", "_imp"})  # the modules patched below
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    fspath, sep = os.fspath, os.sep

    def inside(p):
        if isinstance(p, int):
            return True
        p = realpath(fspath(p))
        if isinstance(p, bytes):
            p = p.decode(errors="replace")
        return p == root or p.startswith(root + sep)

    # /proc/self/mem holds the nonce, /proc/<parent>/environ the trainer's keys; a pipe opened through
    # /proc/<pid>/fd (a run's own stdout, with runs) gives up what the runner was to read from it
    def secret(p):
        p = realpath(fspath(p))
        if isinstance(p, bytes):
            p = p.decode(errors="replace")
        name = p.rpartition("/")[2]
        return p.startswith("/proc/") and (name in ("mem", "environ", "kcore") or name.startswith("pipe:"))

    def hook(event, args):
        if event == "import" and args[0] in fresh:  # not in sys.modules: a copy without the patches below
            raise ImportError("sandbox: importing " + args[0] + " afresh is not allowed")
        if event in blocked:
            error = FrameRefused if event == "sys._getframe" else PermissionError
            raise error("sandbox: " + event + " is not allowed")
        if event == "object.__getattr__" and args[1] in frame_attrs:
            raise PermissionError("sandbox: frame access is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and path is not None and not inside(path):
                raise PermissionError("sandbox: writing outside the working directory is not allowed")
            # a directory fd outside would let dir_fd= calls (which the hook sees only as a relative
            # name) write, delete or rename there
            if path is not None and not isinstance(path, int) and not inside(path) and isdir(path):
                raise PermissionError("sandbox: opening a directory outside the working directory")
            if path is not None and not isinstance(path, int) and secret(path):
                raise PermissionError("sandbox: reading a process's memory, environment or pipes is not allowed")
        elif event in path_events:
            if isinstance(args[0], int):  # fchmod, fchown, futimes, ftruncate, fsetxattr: the fd's file
                args = (readlink("/proc/self/fd/" + str(args[0])), *args[1:])
            for a in args:
                if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                    raise PermissionError("sandbox: " + event + " outside the working directory")

    # Imported before the hook: threading's own imports (functools -> namedtuple) call sys._getframe,
    # which the hook blocks; whether they are loaded already depends on the interpreter's startup
    # (a venv's site imports less than a system Python's).
    import _thread
    import threading

    inside, secret = _sealed(inside, private), _sealed(secret, private)  # the hook's closure sees these
    sys.addaudithook(_sealed(hook, private))

    # Threads have no audit event; RLIMIT_NPROC = 0 stops them for a non-root child, this for a root one.
    def no_threads(*args, **kwargs):
        raise RuntimeError("sandbox: can't start new thread")

    for mod in (_thread, threading):
        for name in ("start_new_thread", "start_new", "start_joinable_thread", "_start_new_thread",
                     "_start_joinable_thread"):
            if hasattr(mod, name):
                setattr(mod, name, no_threads)

    # Nor do mknod (a root child's device node in its directory opens the disk) and mkfifo.
    def no_nodes(*args, **kwargs):
        raise PermissionError("sandbox: mknod and mkfifo are not allowed")

    for mod in (os, sys.modules["posix"]):
        mod.mknod = mod.mkfifo = no_nodes

    # Nor signal handlers: one is called with the frame it interrupted, whose f_back reaches the runner's
    # locals (the nonce) and a scorer child's (its key)
    import _imp, _signal
    real_signal, real_create = _signal.signal, _imp.create_builtin

    def no_handlers(signalnum, handler):
        if callable(handler):
            raise PermissionError("sandbox: signal handlers are not allowed")
        return real_signal(signalnum, handler)

    # a fresh copy of a patched module (importlib builds one through _imp.create_builtin) has the originals
    def create_builtin(spec):
        name = spec.name
        if type(name) is not str or name in fresh:
            raise ImportError("sandbox: importing " + repr(name) + " afresh is not allowed")
        return real_create(types.SimpleNamespace(name=name))

    _signal.signal = _sealed(no_handlers, private)
    _imp.create_builtin = _sealed(create_builtin, {**private, "types": types})

def _main():
    # Locals, not module globals: the exec'd code gets its own namespace and cannot read the nonce there.
    tests_path, forks = sys.argv[6], int(sys.argv[8])
    # what the code could replace before the tests run (builtins, os, sys are shared with it)
    _exec, _compile, _exit, _write, _flush = exec, compile, os._exit, sys.stdout.write, sys.stdout.flush
    _report = sys.__excepthook__
    with open(sys.argv[1], encoding="utf-8") as f:
        src = f.read()
    os.remove(sys.argv[1])  # else readable: a scorer child's source holds its batch's gold answers
    nonce = ""
    tests = None
    if tests_path:
        nonce = sys.stdin.readline().strip()
        # the nonce came through a pipe: leave the code nothing to read it back from
        sys.stdin.close()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = sys.__stdin__ = open(0, closefd=False)
        with open(tests_path, encoding="utf-8") as f:
            tests = f.read()
        os.remove(tests_path)  # a child that is not dropped to nobody could read the asserts back
    for name in filter(None, sys.argv[7].split(",")):
        __import__(name)
    limits = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    if forks:
        _zygote(src, limits, forks, float(sys.argv[9]), int(sys.argv[10]), _exec, _compile, _exit, _report,
                (_flush, sys.stderr.flush))
        return
    _install(*limits)
    sys.argv = ["solution.py"]
    sys.orig_argv = []
    g = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "solution.py"}
    try:
        _exec(_compile(src, "solution.py", "exec"), g)
    except SystemExit:
        if tests is None:
            raise
        # exiting early must not skip the tests (a reward hack)
        sys.stderr.write("sandbox: the code exited before the tests ran\n")
        raise SystemExit(3) from None
    if tests is not None:
        try:
            _exec(_compile(tests, "tests.py", "exec"), g)
        except BaseException as e:  # no sys.excepthook of the code's: it would get this frame
            _report(type(e), e, e.__traceback__)
            try:  # os._exit drops what the code printed and has not flushed yet
                _flush()
            except BaseException:
                pass
            _exit(1)
        # the success marker: os._exit(0) or a fake exit code cannot produce it
        _write("\n" + nonce + "\n")
        _flush()

def _zygote(src, limits, forks, timeout, width, _exec, _compile, _exit, _report, _flushes):
    # Runs no untrusted code: forks a fresh child per run before the limits and the hook (which refuse
    # forks) go on in that child, so what one run changes in its interpreter (a scorer's code, a module)
    # no later run sees; the expensive preload was imported once, above. A few runs at a time (a fork of
    # a process that imported much, and its exit, are most of a run's cost); their stdout in order.
    import gc, select, signal, time
    gc.freeze()  # else a run's collection writes to every object the preload made: copies all their pages
    line = os.read(0, 4096)  # the secret's line (or nothing): each run gets a copy on a fresh stdin
    # of a run's stdout, its first and last bytes, its share of the output cap (the trainer reads no more
    # than that): one that floods it crowds out no other
    keep = max(64, (limits[2] // forks - 1) // 2)
    running, outputs, started, written = [], {}, 0, 0

    def start(i):
        stdin_r, stdin_w = os.pipe()
        os.write(stdin_w, line)  # one short line: fits the pipe
        os.close(stdin_w)
        out_r, out_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:  # never back into the loop: the child ends here whatever the code does
                for fd in [r.out for r in running] + [out_r]:
                    os.close(fd)
                os.dup2(stdin_r, 0)
                os.dup2(out_w, 1)
                os.close(stdin_r)
                os.close(out_w)
                _install(*limits)
                sys.argv = ["solution.py", str(i)]
                sys.orig_argv = []
                g = {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "solution.py"}
                _exec(_compile(src, "solution.py", "exec"), g)
                status = 0
            except SystemExit as e:
                status = 0 if e.code is None else e.code if type(e.code) is int else 1
            except BaseException as e:
                _report(type(e), e, e.__traceback__)
            finally:
                for flush in _flushes:  # os._exit drops what the code printed and has not flushed yet
                    try:
                        flush()
                    except BaseException:
                        pass
                _exit(status & 0xFF)
        os.close(stdin_r)
        os.close(out_w)
        return types.SimpleNamespace(i=i, pid=pid, out=out_r, deadline=time.monotonic() + timeout, head=b"",
                                     tail=b"", eof=False)

    def read(run):
        chunk = os.read(run.out, 1 << 16)
        run.eof = not chunk
        if len(run.head) < keep:
            run.head, chunk = run.head + chunk[: keep - len(run.head)], chunk[keep - len(run.head) :]
        run.tail = (run.tail + chunk)[-keep:]

    while written < forks:
        while started < forks and len(running) < width:
            running.append(start(started))
            started += 1
        now = time.monotonic()
        for run in list(running):
            if not run.eof and now < run.deadline:
                continue
            # done when it exited (it may close its stdout and go on), else killed at its deadline
            if os.waitpid(run.pid, os.WNOHANG)[0] == 0:
                if now < run.deadline:
                    continue
                os.kill(run.pid, signal.SIGKILL)
                os.waitpid(run.pid, 0)
                os.write(2, b"sandbox: run %d timed out\n" % run.i)
            while not run.eof:  # what it wrote before it died: no writer is left, so this ends
                read(run)
            os.close(run.out)
            running.remove(run)
            out = run.head + run.tail
            outputs[run.i] = out if out.endswith(b"\n") or not out else out + b"\n"
        while written in outputs:
            os.write(1, outputs.pop(written))
            written += 1
        if not running:
            continue
        wait = max(0.0, min(r.deadline for r in running) - now)
        if any(r.eof for r in running):
            wait = min(wait, 0.0005)  # it is exiting
        readable = [r.out for r in running if not r.eof]
        if not readable:
            time.sleep(wait)
            continue
        for fd in select.select(readable, [], [], wait)[0]:
            read(next(r for r in running if r.out == fd))

_main()
""".replace("NOBODY_UID", str(NOBODY))


@dataclass(frozen=True)
class SandboxConfig:
    timeout: float = 2.0  # wall clock, seconds
    memory_mb: int = 512  # address space (RLIMIT_AS; not on macOS); Python alone maps ~30 MB
    cpu_seconds: int | None = None  # RLIMIT_CPU; default ceil(timeout)
    max_output_bytes: int = 1 << 20  # RLIMIT_FSIZE: caps files written and captured stdout/stderr
    isolate_network: bool = (
        True  # use a network namespace when available (the audit hook blocks sockets anyway)
    )
    # run_tests: wall clock for all of a program's stdin/stdout cases together (default 10 x timeout);
    # the cases left when it is spent fail without running, as after a timeout. run_python with ``runs``:
    # for the whole process, preload and every run (default 2 x timeout + runs x timeout)
    total_timeout: float | None = None


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool  # wall clock or CPU limit hit
    duration: float
    signal: str | None = None  # the signal that killed the process, if any
    tests_passed: bool | None = None  # with ``tests``: they ran to the end without an error

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and self.tests_passed is not False


@functools.lru_cache(maxsize=1)
def _network_prefix() -> tuple[tuple[str, ...], bool]:
    """(command prefix for a fresh network namespace, whether the child can drop to nobody)."""
    root = os.geteuid() == 0
    candidates: list[tuple[str, ...]] = [("unshare", "--net", "--")] if root else []
    candidates.append(("unshare", "--net", "--map-root-user", "--"))
    for prefix in candidates:
        try:
            r = subprocess.run([*prefix, "true"], capture_output=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            # inside a user namespace only our own uid is mapped: setuid(nobody) would fail there
            return prefix, root and "--map-root-user" not in prefix and _stdlib_readable_by_others()
    return (), root and _stdlib_readable_by_others()


def _stdlib_readable_by_others() -> bool:
    """Whether ``nobody`` could run this interpreter (it cannot when Python lives under a 0700 /root)."""
    for target in (Path(sys.executable).resolve(), Path(os.__file__).resolve().parent):
        for d in [target, *target.parents]:
            mode = d.stat().st_mode
            need = stat.S_IROTH if d.is_file() else stat.S_IXOTH | (stat.S_IROTH if d == target else 0)
            if mode & need != need:
                return False
    return True


def network_isolation_available() -> bool:
    return bool(_network_prefix()[0])


def run_python(
    code: str,
    stdin: str = "",
    config: SandboxConfig | None = None,
    tests: str | None = None,
    preload: Sequence[str] = (),
    secret: str | None = None,
    runs: int = 0,
    **overrides: Any,
) -> SandboxResult:
    """Run ``code`` as a script in the sandbox; ``overrides`` replace fields of ``config``.

    ``preload``: trusted modules imported before the limits and the audit hook, for code that runs
    untrusted input through a library the hook would stop loading (reasoning-gym's scorers: sympy loads
    ctypes).

    With ``tests`` (Python source, e.g. asserts), they run after the code in its namespace, and
    ``tests_passed`` is True only if they ran to the end: exiting early (``sys.exit(0)``,
    ``os._exit(0)``) fails them. The code gets no stdin in that mode.

    ``secret``: a line the code reads first from its stdin, which then has nothing more: a key for the
    results of trusted code that runs untrusted input (the reasoning-gym scorer child signs its score lines
    with it). It goes through a pipe, as the tests' nonce does: a file holding it could be read back.

    ``runs``: run the code that many times, each in a fresh fork (``sys.argv[1]``: its index) of one process
    that imported ``preload`` (once: the expensive part) and is forked before the limits and the hook go
    on in the child, so that nothing one run changes in its interpreter reaches the next (reasoning-gym's
    scorer child: one answer per run). The limits and ``timeout`` (wall clock) are each run's; a run that
    overruns is killed and the next one starts; ``total_timeout`` bounds the whole. Each run gets the
    ``secret`` line on its stdin; the stdout is the runs' in order, each cut to its first and last bytes
    (its share of ``max_output_bytes``) and ending a line, the stderr theirs together; ``returncode`` is
    the whole process's, not a run's.
    """
    from nanoseek.perf import usable_cpus

    cfg = replace(config or SandboxConfig(), **overrides)
    if sys.platform == "win32":  # no resource limits, process groups or audit-hooked fork to build on
        # (said so for reasoning-gym's scorers too, which run here: "code tasks" misled their users)
        raise ValueError(
            "the code sandbox (code tasks' tests, reasoning-gym's scorers) runs on Linux and macOS only: "
            "score these tasks there"
        )
    if secret is not None and (tests is not None or stdin or "\n" in secret or len(secret) > 1024):
        raise ValueError("a sandbox secret is one short line, and the code's only stdin")
    if runs < 0 or (runs and (tests is not None or stdin)):
        raise ValueError(f"sandbox runs take no tests and no stdin (a secret only), got runs={runs}")
    if cfg.timeout <= 0 or cfg.memory_mb <= 0:
        raise ValueError(
            f"sandbox timeout and memory must be positive, got {cfg.timeout}s / {cfg.memory_mb} MB"
        )
    prefix, drop = (
        _network_prefix() if cfg.isolate_network else ((), os.geteuid() == 0 and _stdlib_readable_by_others())
    )
    cpu = cfg.cpu_seconds if cfg.cpu_seconds is not None else max(1, math.ceil(cfg.timeout))
    # macOS refuses any address-space cap (setrlimit: EINVAL, a ValueError in every run: all code failed
    # its tests) and would not enforce one
    mem = 0 if sys.platform == "darwin" else cfg.memory_mb << 20
    # runs at a time: no more than the CPUs this process may use (os.cpu_count() counts a container's
    # host: 8 runs at once on its 2 CPUs had a quarter of one each, and right answers ran out their clocks)
    width = max(1, min(runs, 8, usable_cpus())) if runs else 0
    with tempfile.TemporaryDirectory(prefix="nanoseek-sandbox-", ignore_cleanup_errors=True) as tmp:
        base = Path(tmp)
        work = base / "work"
        work.mkdir()
        code_path = base / "solution.py"
        code_path.write_text(code, encoding="utf-8")
        nonce = secrets.token_hex(16)
        piped = secret if secret is not None else nonce if tests is not None else None
        if tests is not None:
            (base / "tests.py").write_text(tests, encoding="utf-8")
            stdin = ""  # the code gets no stdin; the nonce goes through a pipe (below), never a file
        (base / "stdin").write_text(stdin, encoding="utf-8")
        if drop:
            os.chown(work, NOBODY, NOBODY)
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(work),
            "TMPDIR": str(work),
        }
        cmd = [
            *prefix, sys.executable, "-I", "-c", _RUNNER, str(code_path),
            str(mem), str(cpu), str(cfg.max_output_bytes), "1" if drop else "0",
            str(base / "tests.py") if tests is not None else "", ",".join(preload),
            str(runs), str(cfg.timeout), str(width),
        ]  # fmt: skip
        t0 = time.perf_counter()
        with (
            open(base / "stdin", "rb") as fin,
            open(base / "stdout", "wb") as fout,
            open(base / "stderr", "wb") as ferr,
        ):
            proc = subprocess.Popen(
                cmd,
                cwd=work,
                env=env,
                stdin=subprocess.PIPE if piped is not None else fin,
                stdout=fout,
                stderr=ferr,
                start_new_session=True,
                close_fds=True,
            )
            timed_out = False
            if proc.stdin is not None and piped is not None:  # one short line: fits the pipe, never blocks
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write((piped + "\n").encode())
                    proc.stdin.close()
            wall = cfg.timeout
            if runs:
                wall = cfg.total_timeout if cfg.total_timeout is not None else (2 + runs) * cfg.timeout
            try:
                proc.wait(timeout=wall)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # the whole group: anything the code managed to start dies with it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        duration = time.perf_counter() - t0
        rc = proc.returncode
        sig = signal.Signals(-rc).name if rc is not None and rc < 0 else None
        if sig == "SIGXCPU":
            timed_out = True
        stdout = _read_capped(base / "stdout", cfg.max_output_bytes)
        tests_passed = None
        if tests is not None:
            body, _, last = stdout.rstrip("\n").rpartition("\n")
            tests_passed = not timed_out and rc == 0 and last == nonce
            stdout = body if last == nonce else stdout
        return SandboxResult(
            returncode=None if timed_out else rc,
            stdout=stdout,
            stderr=_read_capped(base / "stderr", cfg.max_output_bytes),
            timed_out=timed_out,
            duration=duration,
            signal=None if timed_out and sig == "SIGKILL" else sig,
            tests_passed=tests_passed,
        )


def _read_capped(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _same_output(expected: str, got: str) -> bool:
    # trailing whitespace per line and blank lines at either end do not count (as in most judges); the
    # indentation of the first line does (a pattern's apex)
    norm = lambda s: "\n".join(line.rstrip() for line in s.splitlines()).strip("\n")  # noqa: E731
    return norm(expected) == norm(got)


def run_tests(
    code: str, tests: str | list[dict[str, str]], config: SandboxConfig | None = None
) -> tuple[int, int, list[SandboxResult]]:
    """(passed, total, results) for ``code`` against ``tests``.

    ``tests`` is either Python source (asserts) run after the code in the same process: one test, passed
    iff the tests run to the end (see ``run_python``); or a list of ``{"input": stdin, "output": expected stdout}`` cases, each run
    separately. After a case times out the remaining cases are counted as failed without running them
    (a looping program would only burn the same timeout again), and so are those left when the cases
    together have run for ``config.total_timeout`` (a program just under the timeout on each of many
    cases would take timeout x cases); a case gets at most what is left of it.
    """
    if isinstance(tests, str):
        r = run_python(code, config=config, tests=tests)
        return int(r.ok), 1, [r]
    if not isinstance(tests, list) or not tests:
        raise ValueError("tests must be Python source or a non-empty list of {'input', 'output'} cases")
    cfg = config or SandboxConfig()
    budget = cfg.total_timeout if cfg.total_timeout is not None else 10 * cfg.timeout
    if budget <= 0:
        raise ValueError(f"sandbox total_timeout must be positive, got {budget}s")
    passed = 0
    results: list[SandboxResult] = []
    for case in tests:
        left = budget - sum(r.duration for r in results)
        if left <= 0:
            break
        # "input": null is no input, as a case without one: str() of it fed the program "None"
        stdin = case.get("input")
        stdin = "" if stdin is None else str(stdin)
        r = run_python(code, stdin=stdin, config=cfg, timeout=min(cfg.timeout, left))
        results.append(r)
        passed += int(r.ok and _same_output(str(case["output"]), r.stdout))
        if r.timed_out:
            break
    return passed, len(tests), results
