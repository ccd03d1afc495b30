"""The code-execution sandbox (model/execution.py, docs/inference.md#code-execution-sandbox): limits, isolation, and HumanEval programs.

Isolation tests run each escape under several layer sets: everything (what execute_code does), the kernel
layers without the Python guards, the Python guards without any kernel layer, and each kernel layer meant to
stop that escape alone, so that each is shown to hold by itself. A control run with no layer shows the escape
works at all. A kernel layer the machine does not offer is skipped with a reason (the other layers then
protect the run).
"""

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from model.execution import ALL_LAYERS, KERNEL_LAYERS, TIMEOUT_ERROR, _execute, build_program, execute_code

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox tests assume Linux")

LAYERS = {"all": ALL_LAYERS, "kernel": KERNEL_LAYERS, "python": ("python-guards",), "netns": ("netns",),
          "landlock": ("landlock",), "seccomp": ("seccomp",)}
NEEDS = {"netns": "netns", "landlock": "landlock-fs", "seccomp": "seccomp"}  # what the child reports applying


@pytest.fixture(scope="module")
def kernel_features() -> set[str]:
    return set(_execute("pass", 10, None, layers=KERNEL_LAYERS).sandbox)


def run_layer(layer: str, code: str, kernel_features: set[str], needs: str | None = None, timeout: float = 10.0):
    needs = NEEDS.get(layer) if layer in NEEDS else (needs if layer == "kernel" else None)
    if needs and needs not in kernel_features:
        pytest.skip(f"this kernel/container offers no {needs} (applied: {sorted(kernel_features)})")
    return _execute(code, timeout, 256 * 1024 * 1024, layers=LAYERS[layer])


# ------------------------------------------------------------------------------------- limits


def test_infinite_loop_times_out():
    t0 = time.time()
    r = execute_code("while True:\n    pass\n", timeout=1.0)
    elapsed = time.time() - t0
    assert r.timeout and not r.success
    assert r.error == TIMEOUT_ERROR and r.stdout == "" and r.stderr == ""
    assert 1.0 <= elapsed < 3.0


def test_timeout_kills_the_whole_process_group(tmp_path):
    # Both layers off, so that the child can start a grandchild at all: the group kill must still reap it.
    pid_file = tmp_path / "pid"
    code = ("import subprocess, time\n"
            "p = subprocess.Popen(['sleep', '60'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "while True:\n    time.sleep(0.01)\n")
    r = _execute(code, 2.0, None, layers=())
    assert r.timeout
    pid = int(pid_file.read_text())
    time.sleep(0.2)
    stat = Path(f"/proc/{pid}/stat")
    state = stat.read_text().rsplit(")", 1)[1].split()[0] if stat.exists() else "gone"
    assert state in ("gone", "Z", "X"), f"grandchild {pid} still running (state {state})"


def test_memory_hog_is_stopped(kernel_features):
    t0 = time.time()
    r = execute_code("x = bytearray(2 * 1024 ** 3)\nprint('allocated')\n", timeout=10.0)
    assert not r.success and "allocated" not in r.stdout
    assert time.time() - t0 < 5.0
    assert r.memory_exceeded and r.error == "MemoryError"
    assert "rlimit-as" in r.sandbox
    assert not r.timeout


def test_no_memory_limit_when_none():
    r = execute_code("x = bytearray(300 * 1024 ** 2)\nprint(len(x))\n", maximum_memory_bytes=None)
    assert r.success, r.stderr
    assert r.stdout == f"{300 * 1024 ** 2}\n"


# ------------------------------------------------------------------------------------ isolation


@pytest.mark.parametrize("layer", ["all", "kernel", "python", "landlock"])
def test_write_outside_temp_dir_fails(layer, tmp_path, kernel_features):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    code = (f"try:\n    open({str(target)!r}, 'w').write('x')\nexcept OSError as e:\n    print('open:', type(e).__name__)\n"
            f"import os\ntry:\n    os.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))\n"
            "except OSError as e:\n    print('os.open:', type(e).__name__)\n"
            f"try:\n    open({str(victim)!r}, 'a').write('x')\nexcept OSError as e:\n    print('append:', type(e).__name__)\n"
            "open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())\n")
    r = run_layer(layer, code, kernel_features, needs="landlock-fs")
    assert r.success, r.stderr
    assert r.stdout == "open: PermissionError\nos.open: PermissionError\nappend: PermissionError\nok\n"
    assert not target.exists()
    assert victim.read_text() == "keep"


def test_temp_dir_is_private_and_removed():
    r = execute_code("import tempfile\nprint(tempfile.gettempdir())\nopen('f', 'w').write('x')\n")
    assert r.success, r.stderr
    work = r.stdout.strip()
    assert Path(work).name == "work" and Path(work).parent.name.startswith("speedrun-exec-")
    assert not Path(work).parent.exists()


@pytest.mark.parametrize("layer", ["all", "kernel", "python", "netns", "seccomp"])
def test_network_is_blocked(layer, kernel_features):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    code = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(2)\n"
            f"s.connect(('127.0.0.1', {port}))\nprint('connected')\n")
    try:
        # Control: with no layer at all the same program reaches the server.
        open_run = _execute(code, 10, None, layers=())
        assert open_run.success and open_run.stdout == "connected\n", open_run.stderr
        server.accept()[0].close()
        needs = "netns" if "netns" in kernel_features else "landlock-net"
        r = run_layer(layer, code, kernel_features, needs=needs)
        assert not r.success and "connected" not in r.stdout
        assert r.error.split(":")[0] in ("PermissionError", "OSError", "ConnectionRefusedError"), r.error
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing got through
    finally:
        server.close()


# Ways out that worked against the earlier sandbox: each starts a process that outlives the sandboxed program
# (a new session escapes the process-group kill) and writes OUTSIDE a moment later. Fail-safe means: after the
# run and that moment, OUTSIDE does not exist.
LATER = "import time; time.sleep(0.3); open(OUTSIDE, 'w').write('escaped')"
ESCAPES = {
    # subprocess's private handle on the C fork+exec raises no audit event; call_setsid leaves the group
    "fork_exec_setsid": ("import os, subprocess\nr, w = os.pipe()\n"
                         "subprocess._fork_exec(['/bin/sh', '-c', 'sleep 0.3; echo x > ' + OUTSIDE], [b'/bin/sh'], "
                         "True, (), None, None, -1, -1, -1, -1, -1, -1, r, w, True, True, -1, None, None, None, -1, "
                         "None, False)\n"),
    "os_fork": f"import os\nif os.fork() == 0:\n    os.setsid()\n    {LATER}\n    os._exit(0)\n",
    "os_execv": "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo x > ' + OUTSIDE])\n",  # a shell, unaudited
    # the pty child leads a session of its own already; it ignores the hangup when the parent exits
    "pty_fork": ("import os, pty, signal\nif pty.fork()[0] == 0:\n    signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
                 f"    {LATER}\n    os._exit(0)\n"),
    "ctypes_fork": ("import ctypes, os\nlibc = ctypes.CDLL(None)\nif libc.fork() == 0:\n    libc.setsid()\n"
                    f"    {LATER}\n    os._exit(0)\n"),
    "multiprocessing": ("import multiprocessing as mp\ndef later():\n    import os\n    os.setsid()\n"
                        f"    {LATER}\nif __name__ == '__main__':\n    mp.get_context('fork').Process(target=later).start()\n"),
}


def escaped(tmp_path: Path, escape: str, layers) -> tuple[bool, object]:
    outside = tmp_path / f"{escape}.out"
    outside.unlink(missing_ok=True)
    r = _execute(f"OUTSIDE = {str(outside)!r}\n" + ESCAPES[escape], 5, 256 * 1024 * 1024, layers=layers)
    time.sleep(0.8)  # longer than the escaped process waits before writing
    return outside.exists(), r


@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_escape_works_without_the_sandbox(escape, tmp_path):
    """The control: with no layer at all, every escape below does get out."""
    got_out, r = escaped(tmp_path, escape, ())
    assert got_out, (r.stdout, r.stderr)


@pytest.mark.parametrize("layer", ["all", "kernel", "python", "seccomp"])
@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_no_process_escapes_the_sandbox(escape, layer, tmp_path, kernel_features):
    if layer in NEEDS and NEEDS[layer] not in kernel_features or layer == "kernel" and "seccomp" not in kernel_features:
        pytest.skip(f"no seccomp here (applied: {sorted(kernel_features)})")
    got_out, r = escaped(tmp_path, escape, LAYERS[layer])
    assert not got_out, f"{escape} got out under {layer}: {r.stdout} {r.stderr[-500:]}"


SECRETS = {
    "file outside": lambda tmp_path: (tmp_path / "netrc", "machine example.com password hunter2"),
    "parent environment": lambda tmp_path: (Path(f"/proc/{os.getpid()}/environ"), "PATH="),
}


@pytest.mark.parametrize("layer", [None, "all", "kernel", "python", "landlock"])
@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_the_parents_secrets_cannot_be_read(secret, layer, tmp_path, kernel_features):
    """Credentials beside the run (a ~/.netrc) and the parent's environment (/proc/<ppid>/environ)."""
    path, content = SECRETS[secret](tmp_path)
    if not path.exists():
        path.write_text(content)
    code = f"print(open({str(path)!r}, 'rb').read().decode(errors='replace'))\n"
    if layer is None:  # the control
        r = _execute(code, 10, None, layers=())
        assert r.success and content in r.stdout, r.stderr
        return
    r = run_layer(layer, code, kernel_features, needs="landlock-fs")
    assert not r.success and content not in r.stdout
    assert r.error.startswith("PermissionError"), r.error


def test_name_resolution_is_denied(kernel_features):
    code = "import socket\nprint(socket.getaddrinfo('localhost', 80))\n"
    assert _execute(code, 10, None, layers=()).success  # the control: /etc/hosts answers
    for layer in ("all", "python"):
        r = run_layer(layer, code, kernel_features)
        assert not r.success and "getaddrinfo" in r.error, r.error
    r = run_layer("kernel", code, kernel_features, needs="landlock-fs")  # /etc/hosts is not readable either
    assert not r.success and "AF_INET" not in r.stdout


def test_udp_to_the_host_is_blocked(kernel_features):
    """A DNS query is a UDP datagram: none may leave the sandbox, to 127.0.0.1 or anywhere."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    port = receiver.getsockname()[1]
    code = (f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.sendto(b'leak', ('127.0.0.1', {port}))\nprint('sent')\n")
    try:
        assert _execute(code, 10, None, layers=()).stdout == "sent\n"  # the control
        assert receiver.recv(16) == b"leak"
        for layer in ("all", "kernel", "python", "netns", "seccomp"):
            if layer == "kernel" and not {"netns", "seccomp"} & kernel_features:
                continue
            r = run_layer(layer, code, kernel_features)
            assert "sent" not in r.stdout or layer == "netns", (layer, r.stdout)
        with pytest.raises(BlockingIOError):
            receiver.recv(16)  # nothing arrived
    finally:
        receiver.close()


def test_kernel_layers_report_what_they_applied(kernel_features):
    """On this machine's kind (Linux with Landlock and libseccomp) every kernel layer applies."""
    assert {"rlimit-fsize", "rlimit-nproc"} <= kernel_features
    assert "python-guards" not in kernel_features


# ------------------------------------------------------------------------------ spec behaviour


def test_stdout_and_stderr_are_captured():
    r = execute_code("import sys\nprint('out 1')\nprint('err 1', file=sys.stderr)\nprint('out 2')\n")
    assert r.success and r.error is None
    assert r.stdout == "out 1\nout 2\n" and r.stderr == "err 1\n"
    r = execute_code("print('before')\nraise ValueError('bad value')\n")
    assert not r.success and r.stdout == "before\n"
    assert r.error == "ValueError: bad value" and "Traceback" in r.stderr
    r = execute_code("import sys\nsys.exit(3)\n")
    assert not r.success and r.error == "Execution failed"


def test_code_with_quotes_backslashes_braces_survives():
    code = ("s = '''a \"b\" 'c' {d} {{e}} \\\\ \\n'''\n"
            'print(s)\nprint("%s {} \\t|" % "x")\nprint(r"\\d+\\\\")\n'
            "print('__CODE__ __WORK__ __MEM__ __REPORT__')\n")
    expected = "a \"b\" 'c' {d} {{e}} \\ \n\n%s {} \t|\n\\d+\\\\\n__CODE__ __WORK__ __MEM__ __REPORT__\n"
    expected = expected.replace("%s {}", "x {}")
    r = execute_code(code)
    assert r.success, r.stderr
    assert r.stdout == expected


def test_guards_and_fresh_globals():
    checks = ["os.system", "os.fork", "os.kill", "os.remove", "os.getcwd", "os.chdir", "shutil.rmtree",
              "subprocess.Popen", "exit", "quit", "help"]
    code = "import os, shutil, subprocess\n" + "".join(f"print({c} is None)\n" for c in checks)
    code += ("import faulthandler\nprint(faulthandler.is_enabled())\nprint(os.environ['OMP_NUM_THREADS'])\n"
             "print(sorted(k for k in globals() if not k.startswith('__')))\n")
    for blocked in ("resource", "psutil", "joblib", "ipdb", "tkinter"):
        code += f"try:\n    import {blocked}\n    print('imported')\nexcept ImportError:\n    print('blocked')\n"
    r = execute_code(code)
    assert r.success, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:len(checks)] == ["True"] * len(checks)
    # The user's globals hold only what it defined itself (the modules it imported), nothing of the prelude.
    assert lines[len(checks):len(checks) + 3] == ["False", "1", "['faulthandler', 'os', 'shutil', 'subprocess']"]
    assert lines[len(checks) + 3:] == ["blocked"] * 5
    r = execute_code("import os\nos.system('echo pwned')\n")
    assert not r.success and "pwned" not in r.stdout and r.error.startswith("TypeError")


def test_long_program_goes_through_a_file():
    code = "x = 0\n" + "x += 1\n" * 20_000 + "print(x)\n"  # ~140 kB, over the single-argv limit
    r = execute_code(code)
    assert r.success, r.stderr
    assert r.stdout == "20000\n"


def test_bad_arguments_fail_early():
    with pytest.raises(TypeError, match="must be a str"):
        execute_code(b"print(1)")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        execute_code("print(1)", timeout=0)


def test_program_embeds_code_as_a_literal():
    program = build_program("print('__WORK__')", "/w", "/r", None)
    assert program.rstrip().endswith("""exec(compile("print('__WORK__')", "<llm>", "exec"), {"__name__": "__main__"})""")
    assert "_WORK = '/w'" in program


# ------------------------------------------------------------------------------------ HumanEval


def humaneval_program(problem: dict, completion: str) -> str:
    """The HumanEval program: leading import lines of the prompt + code (no fence: the completion stripped) + test + check."""
    imports = []
    for line in problem["prompt"].splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("import ") or line.startswith("from "):
            imports.append(line)
        else:
            break
    return ("\n".join(imports) + "\n\n" + completion.strip() + "\n\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


@pytest.fixture(scope="module")
def humaneval(shared_data) -> list[dict]:
    path = shared_data / "chat_eval" / "humaneval" / "HumanEval.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("index", [0, 2, 32, 162])
def test_humaneval_canonical_passes_and_wrong_fails(humaneval, index):
    problem = humaneval[index]
    gold = problem["prompt"] + "\n" + problem["canonical_solution"]  # the gold assistant message
    r = execute_code(humaneval_program(problem, gold))
    assert r.success, (problem["task_id"], r.stderr)
    wrong = problem["prompt"] + "\n    return None\n"
    r = execute_code(humaneval_program(problem, wrong))
    assert not r.success and r.error.split(":")[0] in ("AssertionError", "TypeError"), r.error
