"""The code sandbox against adversarial programs: each case would do harm (or hang) without its wall."""

import os
import socket
import time
from pathlib import Path

import pytest

from nanoseek.data.sandbox import SandboxConfig, network_isolation_available, run_python, run_tests

FAST = SandboxConfig(timeout=1.5)


def _last_err(r) -> str:
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def test_runs_code_with_stdin_and_captures_output():
    r = run_python(
        "import sys\nn = int(sys.stdin.readline())\nprint(n * 2)\nprint('err', file=sys.stderr)", stdin="21\n"
    )
    assert r.ok and r.stdout == "42\n" and r.stderr == "err\n"
    r = run_python("raise ValueError('boom')")
    assert not r.ok and r.returncode == 1 and "ValueError: boom" in r.stderr


def test_infinite_loop_is_killed():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass", config=FAST)
    assert r.timed_out and not r.ok
    assert time.perf_counter() - t0 < 5


def test_sleeping_code_is_killed_by_wall_clock():
    t0 = time.perf_counter()
    r = run_python("import time\ntime.sleep(60)", config=FAST)
    assert r.timed_out and time.perf_counter() - t0 < 5


def test_fork_and_fork_bomb_are_refused():
    r = run_python("import os\nos.fork()\nprint('forked')", config=FAST)
    assert not r.ok and "forked" not in r.stdout and "os.fork" in r.stderr
    bomb = "import os\nn = 0\nwhile n < 10000:\n    try:\n        os.fork()\n    except Exception:\n        n += 1\nprint('refused', n)"
    t0 = time.perf_counter()
    r = run_python(bomb, config=FAST)
    assert r.ok and r.stdout == "refused 10000\n" and time.perf_counter() - t0 < 5


def test_process_creation_is_refused():
    attempts = {
        "subprocess": "import subprocess; subprocess.run(['echo', 'spawned'])",
        "system": "import os; os.system('echo spawned')",
        "posix_spawn": "import os; os.posix_spawn('/bin/echo', ['echo', 'spawned'], {})",
        "ctypes": "import ctypes; ctypes.CDLL(None).fork(); print('spawned')",
        "thread": "import threading; t = threading.Thread(target=print, args=('spawned',)); t.start(); t.join()",
        "exec": "import os; os.execv('/bin/echo', ['echo', 'spawned'])",  # last: it would replace the process
    }
    src = "\n".join(
        f"try:\n    exec({code!r})\nexcept Exception as e:\n    print('blocked {name}', type(e).__name__)"
        for name, code in attempts.items()
    )
    r = run_python(src, config=FAST)
    assert "spawned" not in r.stdout
    assert [line.split()[1] for line in r.stdout.splitlines()] == list(attempts)


def test_signals_to_other_processes_are_refused():
    r = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", config=FAST)
    assert not r.ok and "os.kill" in r.stderr  # and we are still here


def test_network_is_unreachable():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        src = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')\nprint('connected')"
        r = run_python(src, config=FAST)
        assert not r.ok and "connected" not in r.stdout
        with pytest.raises(TimeoutError):
            server.accept()  # nothing ever reached us
        r = run_python(
            "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)", config=FAST
        )
        assert not r.ok
        # the raw C module is guarded too
        r = run_python("import _socket\n_socket.socket()\nprint('created')", config=FAST)
        assert not r.ok and "created" not in r.stdout
    finally:
        server.close()


def test_network_namespace_when_available():
    if not network_isolation_available():
        pytest.skip("unshare --net is not permitted here (the audit hook still blocks sockets)")
    # even with the audit hook out of the picture, the namespace has no route: check its interfaces
    r = run_python("print(open('/proc/net/dev').read())", config=FAST)
    assert r.ok
    interfaces = {line.split(":")[0].strip() for line in r.stdout.splitlines()[2:] if ":" in line}
    assert interfaces <= {"lo"}


def test_memory_is_limited():
    r = run_python("x = bytearray(4 << 30)\nprint('allocated')", config=FAST)
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout
    t0 = time.perf_counter()
    r = run_python("a = []\nwhile True:\n    a.append(' ' * (1 << 20))", config=FAST, memory_mb=128)
    assert not r.ok and time.perf_counter() - t0 < 5


def test_no_address_space_cap_on_macos_and_a_clear_error_on_windows(monkeypatch):
    """macOS refuses setrlimit(RLIMIT_AS) with EINVAL (CPython issues 78783, 84698): the runner died
    with a ValueError before the code ran, and every code answer failed its tests (reward 0). Windows
    has no `os.geteuid`, `os.killpg` or `resource`: an AttributeError, where a clear error is due."""
    import resource
    import sys

    show = "import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0])"
    assert run_python(show, config=FAST).stdout.strip() == str(FAST.memory_mb << 20)
    monkeypatch.setattr(sys, "platform", "darwin")
    r = run_python(show, config=FAST)
    assert r.ok and r.stdout.strip() == str(resource.RLIM_INFINITY)
    assert run_tests("def f(x):\n    return x + 1", "assert f(1) == 2", FAST)[:2] == (1, 1)
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(ValueError, match="reasoning-gym's scorers.*Linux and macOS only"):
        run_python("print(1)", config=FAST)


def test_files_stay_in_a_throwaway_directory(tmp_path):
    outside = tmp_path / "victim.txt"
    outside.write_text("safe")
    attempts = {
        "write": f"open({str(outside)!r}, 'w').write('pwned')",
        "remove": f"import os; os.remove({str(outside)!r})",
        "chdir": f"import os; os.chdir({str(tmp_path)!r}); open('victim.txt', 'a').write('pwned')",
        "symlink": f"import os; os.symlink({str(outside)!r}, 'link'); open('link', 'w').write('pwned')",
    }
    src = "\n".join(
        f"try:\n    exec({code!r})\nexcept PermissionError:\n    print('blocked {name}')"
        for name, code in attempts.items()
    )
    r = run_python(src, config=FAST)
    assert r.stdout.split() == [w for name in attempts for w in ("blocked", name)]
    assert outside.read_text() == "safe"
    # inside its own directory the code may write; the directory is gone afterwards
    r = run_python("import os\nopen('f.txt', 'w').write('hi')\nprint(os.getcwd())", config=FAST)
    assert r.ok and not Path(r.stdout.strip()).exists()


def test_output_and_file_floods_are_capped():
    t0 = time.perf_counter()
    r = run_python("while True:\n    print('x' * 10000)", config=FAST, max_output_bytes=1 << 16)
    assert not r.ok and len(r.stdout) <= 1 << 16 and time.perf_counter() - t0 < 5
    r = run_python("open('big', 'wb').write(b'0' * (10 << 20))", config=FAST, max_output_bytes=1 << 20)
    assert not r.ok


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("NANOSEEK_SECRET", "hunter2")
    r = run_python("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)", config=FAST)
    assert r.ok and "hunter2" not in r.stdout and "NANOSEEK_SECRET" not in r.stdout
    assert r.stdout.splitlines()[-1] == "1"


def test_unprivileged_when_started_as_root():
    r = run_python("import os\nprint(os.getuid())", config=FAST)
    assert r.ok
    if os.geteuid() == 0 and r.stdout.strip() == "0":
        # only when nobody cannot read this interpreter (e.g. pyenv under a 0700 /root)
        from nanoseek.data.sandbox import _stdlib_readable_by_others

        assert not _stdlib_readable_by_others()


def test_run_tests_asserts_and_stdio():
    assert run_tests("def sq(x):\n    return x * x", "assert sq(3) == 9\nassert sq(-2) == 4")[:2] == (1, 1)
    assert run_tests("def sq(x):\n    return x + x", "assert sq(3) == 9")[:2] == (0, 1)
    cases = [{"input": "3", "output": "6"}, {"input": "5\n", "output": "10\n"}, {"input": "1", "output": "3"}]
    assert run_tests("print(int(input()) * 2)", cases)[:2] == (2, 3)
    # the right output, then a crash: not a pass
    assert run_tests("print(int(input()) * 2)\nraise SystemExit(1)", cases)[:2] == (0, 3)
    # trailing spaces and blank lines at the ends do not count; the first line's indentation does
    pyramid = [{"input": "", "output": "  *\n ***\n*****\n"}]
    assert run_tests("print('\\n  *  \\n ***\\n*****\\n')", pyramid)[:2] == (1, 1)
    assert run_tests("print('*\\n ***\\n*****')", pyramid)[:2] == (0, 1)
    with pytest.raises(ValueError):
        run_tests("print(1)", [])


def test_a_case_with_null_input_gets_no_input():
    """`"input": null` (a JSONL task's case without stdin) was fed to the program as the text "None"."""
    echo = "import sys\nprint(sys.stdin.read().strip() or 'hello')"
    assert run_tests(echo, [{"input": None, "output": "hello"}])[:2] == (1, 1)


@pytest.mark.parametrize(
    "exit_early", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"]
)
def test_exiting_before_the_tests_does_not_pass_them(exit_early):
    passed, total, (r,) = run_tests(f"def sq(x):\n    return 0\n{exit_early}", "assert sq(3) == 9", FAST)
    assert (passed, total) == (0, 1) and r.tests_passed is False
    # even right code that exits at its end: the tests did not run (documented in run_python)
    r = run_python(f"def sq(x):\n    return x * x\n{exit_early}", tests="assert sq(3) == 9", config=FAST)
    assert r.tests_passed is False and ("_exit" in exit_early or "exited before the tests ran" in r.stderr)


def test_timeout_stops_remaining_cases():
    t0 = time.perf_counter()
    passed, total, results = run_tests("while True:\n    pass", [{"input": "", "output": "1"}] * 5, FAST)
    assert (passed, total) == (0, 5) and len(results) == 1 and time.perf_counter() - t0 < 5


def test_a_programs_cases_together_stop_at_the_total_timeout(monkeypatch):
    # a program just under the timeout on every case took timeout x cases (50 cases: 100 s for one
    # completion, a GRPO step stalled); the cases share total_timeout, the ones left fail unrun
    import nanoseek.data.sandbox as sandbox

    given = []

    def slow(code, stdin="", config=None, tests=None, **overrides):
        given.append(overrides["timeout"])
        return sandbox.SandboxResult(0, "1", "", timed_out=False, duration=1.5)

    monkeypatch.setattr(sandbox, "run_python", slow)
    cfg = SandboxConfig(timeout=2.0, total_timeout=4.0)
    passed, total, results = run_tests("print(1)", [{"input": "", "output": "1"}] * 5, cfg)
    assert (passed, total, len(results)) == (3, 5, 3) and given == [2.0, 2.0, 1.0]
    given.clear()
    assert run_tests("print(1)", [{"input": "", "output": "1"}] * 20, SandboxConfig(timeout=2.0))[:2] == (
        14,
        20,
    )
    assert given[-1] == pytest.approx(20 - 13 * 1.5)  # by default 10 x timeout
    # spent exactly: the next case is not run with a zero timeout (a ValueError in run_python)
    given.clear()
    monkeypatch.setattr(
        sandbox,
        "run_python",
        lambda *a, **o: given.append(o["timeout"]) or sandbox.SandboxResult(0, "1", "", False, 2.0),
    )
    assert run_tests("print(1)", [{"input": "", "output": "1"}] * 3, cfg)[:2] == (2, 3) and given == [
        2.0,
        2.0,
    ]
    with pytest.raises(ValueError, match="total_timeout"):
        run_tests("print(1)", [{"input": "", "output": "1"}], SandboxConfig(total_timeout=0))


WRONG_SQ = "def sq(x): return 0\n"
SQ_TESTS = "assert sq(3) == 9\nassert sq(-2) == 4"


def test_nonce_cannot_be_read_back_from_stdin():
    code = "import os\nos.lseek(0, 0, 0)\nn = os.read(0, 100).decode().split()\nprint()\nprint(n[0] if n else '', flush=True)\nos._exit(0)\n"
    assert run_tests(code + WRONG_SQ, SQ_TESTS)[:2] == (0, 1)


def test_nonce_cannot_be_read_from_a_traceback_frame():
    code = (
        "import sys, os\n"
        "def h(t, v, tb):\n"
        "    while tb is not None:\n"
        "        n = tb.tb_frame.f_locals.get('nonce')\n"
        "        if n:\n"
        "            sys.stdout.write('\\n' + n + '\\n'); sys.stdout.flush(); os._exit(0)\n"
        "        tb = tb.tb_next\n"
        "sys.excepthook = h\n"
    )
    assert run_tests(code + WRONG_SQ, SQ_TESTS)[:2] == (0, 1)


def test_stdlib_that_reads_its_callers_frame_works_but_frames_stay_out_of_reach():
    # namedtuple (fractions, decimal, dataclasses, statistics import it), enum and logging ask for their
    # caller's frame and go on without it on a ValueError, as where an interpreter has none
    code = (
        "from fractions import Fraction\nfrom decimal import Decimal\nimport statistics, logging\n"
        "from dataclasses import dataclass\nfrom collections import namedtuple\n"
        "@dataclass\nclass P:\n    x: int\n"
        "Q = namedtuple('Q', 'a b')\nlogging.getLogger().warning('w')\n"
        "print(Fraction(1, 3) + Fraction(1, 6), Decimal('0.1') * 3, statistics.median([3, 1, 2]), P(1), Q(1, 2))\n"
    )
    r = run_python(code)
    assert r.ok and r.stdout == "1/2 0.3 2 P(x=1) Q(a=1, b=2)\n", r.stderr
    # the frame itself is still refused: the runner's locals hold the nonce
    steal = (
        "import sys, os\ntry:\n    f = sys._getframe(1)\nexcept PermissionError:\n    print('blocked')\nelse:\n"
        "    n = f.f_locals.get('nonce')\n    sys.stdout.write('\\n' + n + '\\n'); sys.stdout.flush(); os._exit(0)\n"
    )
    assert run_python(steal).stdout == "blocked\n"
    assert run_tests(steal + WRONG_SQ, SQ_TESTS)[:2] == (0, 1)


def test_replacing_builtins_exec_does_not_skip_the_tests():
    code = (
        "import builtins\n_real = builtins.exec\n"
        "builtins.exec = lambda src, *a, **k: None if getattr(src, 'co_filename', '') == 'tests.py' else _real(src, *a, **k)\n"
    )
    assert run_tests(code + WRONG_SQ, SQ_TESTS)[:2] == (0, 1)
    assert run_tests("def sq(x): return x * x\n", SQ_TESTS)[:2] == (1, 1)


def test_dir_fd_does_not_write_outside(tmp_path):
    os.chmod(tmp_path, 0o777)
    code = (
        "import os\n"
        f"fd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        "w = os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)\n"
        "os.write(w, b'x')\n"
    )
    r = run_python(code)
    assert not (tmp_path / "escaped.txt").exists(), r.stderr


def test_nonce_cannot_be_read_from_process_memory():
    code = (
        "import os, re, sys\n"
        "found = set()\n"
        "with open('/proc/self/mem', 'rb', buffering=0) as mem:\n"
        "    for line in open('/proc/self/maps').read().splitlines():\n"
        "        span, perms = line.split()[:2]\n"
        "        lo, hi = (int(v, 16) for v in span.split('-'))\n"
        "        if 'r' in perms and '[v' not in line and hi - lo < 64 << 20:\n"
        "            try:\n"
        "                mem.seek(lo)\n"
        "                found.update(re.findall(rb'(?<![0-9a-zA-Z])[0-9a-f]{32}(?![0-9a-zA-Z])', mem.read(hi - lo)))\n"
        "            except OSError:\n"
        "                pass\n"
        "sys.stdout.write(''.join('\\n' + n.decode() for n in found) + '\\n'); sys.stdout.flush(); os._exit(0)\n"
    )
    assert run_tests(WRONG_SQ + code, SQ_TESTS)[:2] == (0, 1)


def test_tests_and_the_parents_environment_cannot_be_read(monkeypatch):
    monkeypatch.setenv("NANOSEEK_API_KEY", "sk-parent-secret")
    code = (
        "import os\n"
        "for path in ('../tests.py', f'/proc/{os.getppid()}/environ', '/proc/self/mem'):\n"
        "    try:\n"
        "        print(open(path, errors='replace').read())\n"
        "    except OSError as e:\n"
        "        print('blocked', type(e).__name__)\n"
    )
    r = run_python(code, tests="assert 'probe-assert' != 'x'", config=FAST)
    assert "probe-assert" not in r.stdout and "sk-parent-secret" not in r.stdout
    # the refusal itself: /proc/<pid>/environ shows the environment the parent started with, not what it
    # set since (the secret above), and /proc/self/mem read from 0 fails anyway (EIO)
    assert r.stdout.splitlines()[1:] == ["blocked PermissionError"] * 2, r.stdout


def test_monkeypatching_does_not_open_the_audit_hook(tmp_path):
    """The hook runs Python in the code's process: patched builtins, os.path or os must not change its checks;
    calls that name a file by descriptor (fchmod...) and calls without an audit event (mknod) are walls too."""
    os.chmod(tmp_path, 0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("safe")
    os.chmod(victim, 0o644)
    attempts = {
        "builtins": "import builtins; builtins.isinstance = lambda o, t: False",
        "builtins-int": "import builtins; builtins.isinstance = lambda o, t: t is int",
        "posixpath": "import os, posixpath; posixpath.abspath = lambda p: os.getcwd()",
        "os.stat": "import os; os.lstat = os.stat = os.readlink = None",
    }
    for name, patch in attempts.items():
        run_python(f"{patch}\nopen({str(tmp_path / name)!r}, 'w').write('pwned')", config=FAST)
        assert not (tmp_path / name).exists(), name
    by_fd = (
        f"import os\nfd = os.open({str(victim)!r}, os.O_RDONLY)\n"
        "for call in (lambda: os.fchmod(fd, 0o777), lambda: os.setxattr(fd, 'user.x', b'1'),\n"
        f"             lambda: os.mkfifo({str(tmp_path / 'fifo')!r}), lambda: os.mknod('node')):\n"
        "    try:\n        call()\n    except OSError:\n        pass\n"
    )
    run_python(by_fd, config=FAST)
    assert victim.stat().st_mode & 0o777 == 0o644 and not (tmp_path / "fifo").exists()
    assert "user.x" not in getattr(os, "listxattr", lambda p: [])(victim)
    # what a solution may do in its own directory still works
    r = run_python(
        "import os, pathlib\np = pathlib.Path('out.txt'); p.write_text('hi')\nos.chmod(p, 0o600)\n"
        "fd = os.open(p, os.O_RDWR); os.ftruncate(fd, 1); print(p.read_text(), os.path.realpath('.') != '')",
        config=FAST,
    )
    assert r.ok and r.stdout.split() == ["h", "True"], r.stderr


def test_writes_by_descriptor_flags_and_to_a_sibling_of_the_working_directory_are_refused(tmp_path):
    # os.open names no mode string: O_RDWR alone (no O_WRONLY/O_TRUNC) writes, O_CREAT alone creates a file;
    # and the working directory's name is no prefix to write under (its sibling 'work-x' is outside)
    os.chmod(tmp_path, 0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("safe")
    os.chmod(victim, 0o666)
    attempts = {
        "rdwr": f"import os; fd = os.open({str(victim)!r}, os.O_RDWR); os.write(fd, b'pwned')",
        "creat": f"import os; os.open({str(tmp_path / 'created')!r}, os.O_RDONLY | os.O_CREAT, 0o644)",
        "sibling": "import os; open(os.getcwd() + '-x', 'w').write('pwned')",
        "hardlink": f"import os; os.link({str(victim)!r}, 'hl'); open('hl', 'w').write('pwned')",
        "dlopen": "import ctypes; ctypes.CDLL('libc.so.6')",  # a library's constructors run unaudited
    }
    src = "\n".join(
        f"try:\n    exec({code!r})\nexcept PermissionError:\n    print('blocked {name}')"
        for name, code in attempts.items()
    )
    r = run_python(src, config=FAST)
    assert r.stdout.split() == [w for name in attempts for w in ("blocked", name)], r.stderr
    assert victim.read_text() == "safe" and not (tmp_path / "created").exists()


def test_limits_and_environment_the_code_sees():
    # RLIMIT_CPU defaults to ceil(timeout) (hard one more: SIGXCPU first), no processes or core files, output
    # capped; HOME and TMPDIR are the working directory
    show = (
        "import os, resource as r, tempfile\nprint(*r.getrlimit(r.RLIMIT_CPU))\n"
        "print(*(r.getrlimit(k)[0] for k in (r.RLIMIT_NPROC, r.RLIMIT_CORE, r.RLIMIT_FSIZE)))\n"
        "print(os.path.realpath(os.environ['HOME']) == os.getcwd() == os.path.realpath(tempfile.gettempdir()))"
    )
    assert run_python(show, config=FAST).stdout.split() == [
        "2",
        "3",
        "0",
        "0",
        str(FAST.max_output_bytes),
        "True",
    ]
    assert run_python(show, config=FAST, cpu_seconds=5).stdout.split()[:2] == ["5", "6"]
    for bad in ({"timeout": 0}, {"memory_mb": 0}):
        with pytest.raises(ValueError, match="positive"):
            run_python("print(1)", config=FAST, **bad)


_STEAL = (
    "import sys, os\n"
    "def steal(f):\n"
    "    while f is not None:\n"
    "        n = f.f_locals.get('nonce')\n"
    "        if n:\n"
    "            sys.stdout.write('\\n' + n + '\\n'); sys.stdout.flush(); os._exit(0)\n"
    "        f = f.f_back\n"
)


@pytest.mark.parametrize(
    "reach",
    [
        "    try:\n        raise ValueError\n    except ValueError as e:\n        steal(e.__traceback__.tb_frame)\n",
        "    def gen():\n        steal(g.gi_frame)\n        yield\n    g = gen()\n    next(g)\n",
        "    async def co():\n        steal(c.cr_frame)\n    c = co()\n    c.send(None)\n",
    ],
    ids=["traceback", "generator", "coroutine"],
)
def test_nonce_cannot_be_read_by_walking_back_from_the_codes_own_frame(reach):
    # the tests call the code: a frame of its own leads back (f_back) to the runner's locals and the nonce
    code = _STEAL + "def sq(x):\n" + reach + "    return 0\n"
    r = run_python(code, tests=SQ_TESTS, config=FAST)
    assert not r.ok and r.tests_passed is False and "frame access is not allowed" in r.stderr


def test_nonce_cannot_be_read_from_a_signal_handlers_frame():
    # a handler is called with the frame it interrupted: f_back led to the runner's locals, and wrong
    # code passed its tests; a fresh copy of the signal module (or of posix, for mknod) is no way round
    reach = (
        "signal.signal(signal.SIGUSR1, lambda n, f: steal(f))\nsignal.raise_signal(signal.SIGUSR1)\n",
        "import sys\ndel sys.modules['_signal']\nimport _signal\n"
        "_signal.signal(signal.SIGUSR1, lambda n, f: steal(f))\nsignal.raise_signal(signal.SIGUSR1)\n",
        "import importlib.util as u\ns = u.module_from_spec(u.find_spec('_signal'))\n"
        "s.signal(signal.SIGUSR1, lambda n, f: steal(f))\nsignal.raise_signal(signal.SIGUSR1)\n",
    )
    for r in reach:
        assert run_tests(_STEAL + "import signal\n" + r + WRONG_SQ, SQ_TESTS, FAST)[:2] == (0, 1), r
    node = (
        "import os, stat, sys\ndel sys.modules['posix']\nimport posix\nposix.mknod('n', stat.S_IFIFO | 0o600)"
    )
    r = run_python(node + "\nprint(os.path.exists('n'))", config=FAST)
    assert not r.ok and "afresh is not allowed" in r.stderr
    # a handler that is not a function, and builtin modules imported for the first time, still work
    r = run_python(
        "import signal, _bisect\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ok')", config=FAST
    )
    assert r.ok and r.stdout == "ok\n", r.stderr


def test_code_cannot_read_its_own_source_file_back():
    # the scorer child's source holds its batch's answers and their gold: an answer it ran found the path
    # in /proc/self/cmdline
    code = "x = 'marker'\nargs = open('/proc/self/cmdline').read().split('\\0')\n"
    code += "print([open(a).read() for a in args if a.endswith('solution.py')])"
    r = run_python(code, config=FAST)
    assert "marker" not in r.stdout and "FileNotFoundError" in r.stderr, (r.stdout, r.stderr)


def test_result_fields_stdout_with_tests_and_undecodable_output():
    # with tests, stdout is the code's own output (the success marker taken off), whole when they fail
    r = run_python("print('hi')\ndef sq(x): return x * x", tests=SQ_TESTS, config=FAST)
    assert r.ok and r.tests_passed and r.stdout == "hi\n"
    r = run_python("print('hi', end='')\ndef sq(x): return x * x", tests=SQ_TESTS, config=FAST)
    assert r.ok and r.stdout == "hi"  # output without a final newline does not hide the success marker
    r = run_python("print('hi')\n" + WRONG_SQ, tests=SQ_TESTS, config=FAST)
    assert not r.ok and r.tests_passed is False and r.stdout == "hi\n" and "AssertionError" in r.stderr
    # bytes that are not UTF-8 are replaced, not a UnicodeDecodeError in the trainer
    r = run_python("import sys\nsys.stdout.buffer.write(b'\\xff\\xfeok\\n')", config=FAST)
    assert r.ok and r.stdout == "\ufffd\ufffdok\n"
    # a wall-clock kill: no return code, no signal (timed_out says it); the CPU limit: SIGXCPU, timed out too
    r = run_python("import time\ntime.sleep(60)", config=FAST)
    assert r.timed_out and r.returncode is None and r.signal is None
    r = run_python("while True:\n    pass", timeout=10, cpu_seconds=1)
    assert r.timed_out and not r.ok and r.signal == "SIGXCPU" and r.duration < 8


def test_preloaded_module_is_imported_before_the_hook():
    """reasoning-gym's scorers need sympy, which loads ctypes: refused under the hook, so the scorer
    child imports it first; what the untrusted code then does with ctypes is still refused."""
    r = run_python("import ctypes\nprint('loaded')", config=FAST)
    assert not r.ok and "ctypes.dlopen is not allowed" in r.stderr
    r = run_python(
        "import ctypes\nprint('loaded')\nctypes.pythonapi.Py_IsInitialized()",
        config=FAST,
        preload=("ctypes",),
    )
    assert r.stdout == "loaded\n" and "sandbox: ctypes.dlsym is not allowed" in _last_err(r)


def test_runs_at_a_time_are_no_more_than_the_usable_cpus(monkeypatch):
    """The runs at a time were counted from os.cpu_count(), a container's host's CPUs: 8 at once on its 2
    each took 4x their time, and right answers ran out their wall clocks (scored 0)."""
    import nanoseek.perf

    monkeypatch.setattr(nanoseek.perf, "usable_cpus", lambda: 1)
    code = """import os, sys, time
i = sys.argv[1]
open("run" + i, "w").close()
waited = time.monotonic() + 0.5  # for a run beside it to start
while time.monotonic() < waited and len(os.listdir(".")) < 2:
    time.sleep(0.01)
print(i, len(os.listdir(".")))
os.remove("run" + i)
"""
    r = run_python(code, config=FAST, secret="k", runs=2)
    assert r.stdout.splitlines() == ["0 1", "1 1"]


def test_runs_are_fresh_forks_with_their_own_limits():
    """``runs``: the code once per run, each in a fresh fork of the process that imported the preload (the
    reasoning-gym scorer child: an answer that patched a module scored every later one in its child).
    A run's change to a module is not the next run's, a run that hangs or floods its stdout costs only
    itself, each run still has the hook and the limits, and its stdin is the secret line."""
    code = """import json, os, sys, time
i = int(sys.argv[1])
print(i, json.dumps.__name__, sys.stdin.readline().strip(), flush=i in (1, 2))  # 0, 3, 4: at exit
json.dumps = lambda *a: "patched"
if i == 1:
    time.sleep(60)
if i == 2:
    os.write(1, b"x" * 100_000)
if i == 3:
    os.fork()
if i == 4:  # its stdout is a pipe: reading it back would take what the runner reads
    os.open("/proc/self/fd/1", os.O_RDONLY)
"""
    r = run_python(
        code, config=FAST, preload=("json",), secret="k3y", runs=5, timeout=0.5, max_output_bytes=4096
    )
    lines = [line for line in r.stdout.splitlines() if not line.startswith("x")]
    assert r.returncode == 0 and not r.timed_out and r.duration < 5
    assert lines == [f"{i} dumps k3y" for i in range(5)]
    assert "sandbox: run 1 timed out" in r.stderr and "os.fork is not allowed" in r.stderr
    assert "environment or pipes is not allowed" in r.stderr
    assert len(r.stdout) <= 4096  # the flood is cut to its share of the output: the runs after it are read
    with pytest.raises(ValueError, match="runs"):
        run_python("pass", tests="assert True", runs=2)
