"""Sandboxed execution of model-written Python (docs/inference.md#code-execution-sandbox), used to score HumanEval completions.

``execute_code(code)`` runs ``code`` in a fresh interpreter (``sys.executable -B -c <program>``) whose cwd is
a new private temporary directory (deleted afterwards), with the environment reduced to
``PATH=/usr/bin:/bin``, stdin from /dev/null, stdout/stderr captured, and a wall-clock timeout after which
the child's whole process group is killed. The program is a guard prelude followed by
``exec(compile(<repr of code>, "<llm>", "exec"), {"__name__": "__main__"})``: the user code gets fresh
globals and any quotes, backslashes or braces survive because it travels as a repr literal.

Layers (``ALL_LAYERS``; ``_execute(layers=...)`` runs with a subset, which the tests use to show that each
layer holds alone). Each kernel layer is detected at run time inside the child and skipped when the kernel
or the container does not offer it (the child records what it applied; ``ExecutionResult.sandbox``):

Enforced by the kernel (cannot be undone from Python, ctypes included, once applied; root included):
- ``netns``: ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` (or ``CLONE_NEWNET`` alone when privileged): the
  child sits in an empty network namespace whose loopback is down, so no TCP/UDP (DNS included) reaches the
  host or the outside, 127.0.0.1 included.
- ``landlock`` (Linux >= 5.13): ``landlock-fs``: writes and execve denied except beneath the temp dir (plus
  /dev/null); reads allowed only beneath the interpreter's own directories, /usr and /lib, a few device and
  system files and the child's own /proc entry: no ~/.netrc, no /etc/shadow, no /proc/<parent>/environ.
  ``landlock-net`` (ABI 4+): TCP bind and connect denied on any port. ``landlock-scope`` (ABI 6+): no
  signals to, and no abstract unix sockets of, processes outside the sandbox.
- ``seccomp``: a filter built with libseccomp (the maintained C library libseccomp2, through ctypes) makes
  execve/execveat, fork/vfork, clone without CLONE_THREAD, socket and socketpair fail with EPERM (clone3
  with ENOSYS, so threads fall back to clone): no process can be created, by any route (``_posixsubprocess``,
  ``os.fork``, ``pty``, ``multiprocessing``, ctypes), so nothing can leave the process group the timeout kills.
- ``rlimits``: ``RLIMIT_FSIZE`` = 16 MiB (also caps captured output), ``RLIMIT_CORE`` = 0, ``RLIMIT_NPROC``
  = 0 (root is exempt from this one; seccomp is not). ``RLIMIT_AS``/``RLIMIT_DATA``/``RLIMIT_STACK`` =
  ``maximum_memory_bytes`` apply whatever the layers (not on macOS, as in the reference).

Enforced by Python (``python-guards``; the fallback where the kernel offers nothing; a determined program
could get around the monkeypatching, not around the audit hook short of memory corruption):
- the reference's guard prelude: faulthandler off, ``exit``/``quit``/``help`` = None, ``OMP_NUM_THREADS=1``, the
  dangerous ``os``/``shutil``/``subprocess`` functions set to None (every exec*/spawn*/posix_spawn, and
  subprocess's private handle on ``_posixsubprocess.fork_exec``, which raises no audit event), imports of
  ipdb, joblib, resource, psutil, tkinter, multiprocessing and _posixsubprocess blocked;
- an audit hook (``sys.addaudithook``, permanent for the interpreter): writes and path-changing calls
  outside the temp dir, reads and directory listings outside the readable roots above, socket creation,
  connect/bind/sendto, name resolution (getaddrinfo, gethostbyname, ...), process creation (fork, exec,
  spawn, system, Popen), signals, and ctypes raise PermissionError. ``tempfile`` is pointed at the temp dir.

Not a security boundary against a hostile program (same stance as the reference); it stops accidents.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

OUTPUT_LIMIT_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: caps files written and the captured stdout/stderr
MAX_ARG_CHARS = 100_000  # Linux refuses a single argv string over 128 KiB: longer programs go via a file
TIMEOUT_ERROR = "Execution timed out (process killed)"


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False
    sandbox: tuple[str, ...] = ()  # the layers the child reported as applied (see the module docstring)


# The prelude runs in the child before the user code. Placeholders are filled with repr() literals.
_PRELUDE = r"""
import sys, os, json, platform
_WORK = __WORK__
_MEM = __MEM__
_FSIZE = __FSIZE__
_LAYERS = set(__LAYERS__)
_applied = []
_report = open(__REPORT__, "w")  # opened before Landlock so the report can still be written afterwards
sys.dont_write_bytecode = True

# What the program may read: the interpreter's own files (it imports lazily), shared libraries, a few device
# and system files, its own /proc entry and its directory. Not the rest of /etc, /root, /home, /tmp or /proc
# (no ~/.netrc, no /proc/<parent>/environ).
_READ_ROOTS = sorted({p for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                  *[q for q in sys.path if q], "/usr", "/lib", "/lib64", "/lib32",
                                  "/etc/ld.so.cache", "/etc/localtime", "/dev/null", "/dev/urandom", "/dev/zero",
                                  "/proc/%d" % os.getpid(), _WORK) if os.path.exists(p)})

def _netns(libc, ctypes):
    # Network: an empty network namespace (own loopback, down). Unprivileged via a user namespace.
    CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
    for flags in (CLONE_NEWUSER | CLONE_NEWNET, CLONE_NEWNET):
        if libc.unshare(ctypes.c_int(flags)) == 0:
            _applied.append("netns")
            return

def _landlock(libc, ctypes):
    # Landlock (syscalls 444-446 on every architecture): writes and execve only beneath the directory, reads
    # only beneath _READ_ROOTS, no TCP, no signals or abstract sockets outside the sandbox.
    sys_create, sys_add, sys_restrict = 444, 445, 446
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(ctypes.c_long(sys_create), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return
    EXECUTE, WRITE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
    fs = EXECUTE | WRITE | READ_FILE | READ_DIR
    for bit in (4, 5, 6, 7, 8, 9, 10, 11, 12):  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
        fs |= 1 << bit
    if abi >= 2:
        fs |= 1 << 13  # refer (link/rename across directories)
    if abi >= 3:
        fs |= 1 << 14  # truncate
    net = 0b11 if abi >= 4 else 0  # bind_tcp | connect_tcp, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets | signals, outside the domain
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    ruleset = libc.syscall(ctypes.c_long(sys_create), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return

    class _PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    def _allow(path, access):
        if not os.path.isdir(path):  # a file takes only the file rights
            access &= EXECUTE | WRITE | READ_FILE | (1 << 14)
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            rule = _PathBeneath(access, fd)
            return libc.syscall(ctypes.c_long(sys_add), ctypes.c_int(ruleset), ctypes.c_int(1),
                                ctypes.byref(rule), ctypes.c_uint32(0)) == 0
        finally:
            os.close(fd)

    try:
        ok = _allow(_WORK, fs & ~EXECUTE)  # everything beneath the directory except execve
        for root in _READ_ROOTS:
            ok = _allow(root, READ_FILE | READ_DIR) and ok
        _allow("/dev/null", READ_FILE | WRITE | ((1 << 14) if abi >= 3 else 0))
        if ok and libc.prctl(ctypes.c_int(38), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                             ctypes.c_ulong(0)) == 0 \
                and libc.syscall(ctypes.c_long(sys_restrict), ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0:
            _applied.append("landlock-fs")
            if net:
                _applied.append("landlock-net")
            if scoped:
                _applied.append("landlock-scope")
    finally:
        os.close(ruleset)

def _seccomp(ctypes):
    # Process creation and sockets denied by the kernel, root included: execve/execveat, fork/vfork, clone
    # without CLONE_THREAD, socket and socketpair fail with EPERM; clone3 (whose flags a filter cannot read)
    # with ENOSYS, so that threads fall back to clone. Through libseccomp (libseccomp2), loaded with ctypes.
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return

    class _Cmp(ctypes.Structure):  # struct scmp_arg_cmp
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                    ("datum_b", ctypes.c_uint64)]

    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_Cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ALLOW, EPERM, ENOSYS, CLONE_THREAD, MASKED_EQ = 0x7FFF0000, 1, 38, 0x00010000, 7
    deny = lambda err: 0x00050000 | err  # SCMP_ACT_ERRNO
    ctx = lib.seccomp_init(ALLOW)
    if not ctx:
        return
    try:
        def rule(name, action, *cmps):
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                return True  # not a syscall on this architecture (fork on arm64)
            array = (_Cmp * len(cmps))(*cmps) if cmps else None
            return lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array) == 0
        ok = all([rule("execve", deny(EPERM)), rule("execveat", deny(EPERM)), rule("fork", deny(EPERM)),
                  rule("vfork", deny(EPERM)), rule("clone", deny(EPERM), _Cmp(0, MASKED_EQ, CLONE_THREAD, 0)),
                  rule("clone3", deny(ENOSYS)), rule("socket", deny(EPERM)), rule("socketpair", deny(EPERM))])
        if ok and lib.seccomp_load(ctx) == 0:
            _applied.append("seccomp")
    finally:
        lib.seccomp_release(ctx)

if sys.platform.startswith("linux") and _LAYERS & {"netns", "landlock", "seccomp"}:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
    for _layer, _apply in (("netns", lambda: _netns(_libc, ctypes)), ("landlock", lambda: _landlock(_libc, ctypes)),
                           ("seccomp", lambda: _seccomp(ctypes))):
        if _layer in _LAYERS:
            try:
                _apply()
            except Exception:
                pass  # a missing feature must never stop the program: the other layers still apply

import resource
def _limit(which, value, name):
    try:
        resource.setrlimit(which, (value, value))
        _applied.append(name)
    except (ValueError, OSError):
        pass
if _MEM is not None and platform.uname().system != "Darwin":
    _limit(resource.RLIMIT_AS, _MEM, "rlimit-as")
    _limit(resource.RLIMIT_DATA, _MEM, "rlimit-data")
    _limit(resource.RLIMIT_STACK, _MEM, "rlimit-stack")
if "rlimits" in _LAYERS:
    _limit(resource.RLIMIT_FSIZE, _FSIZE, "rlimit-fsize")
    _limit(resource.RLIMIT_CORE, 0, "rlimit-core")
    if hasattr(resource, "RLIMIT_NPROC"):
        _limit(resource.RLIMIT_NPROC, 0, "rlimit-nproc")

if "python-guards" in _LAYERS:
    import builtins, faulthandler, shutil, subprocess, tempfile, posixpath, _posixsubprocess
    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TMPDIR"] = _WORK
    tempfile.tempdir = _WORK
    builtins.exit = None
    builtins.quit = None
    builtins.help = None

    _realpath, _join, _isabs, _fspath = posixpath.realpath, posixpath.join, posixpath.isabs, os.fspath
    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _ALLOWED_FILES = ("/dev/null",)
    _DENIED = {"os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "os.kill",
               "os.killpg", "os.startfile", "subprocess.Popen", "pty.spawn", "signal.pthread_kill",
               "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
               "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
               "socket.sethostname", "os.chroot", "os.setuid"}
    # audit event -> positions of its arguments that are paths being changed
    _PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1),
                    "os.link": (1,), "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.chflags": (0,),
                    "os.truncate": (0,), "os.utime": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
                    "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,),
                    "shutil.copymode": (1,), "shutil.copystat": (1,), "shutil.copytree": (1,),
                    "shutil.chown": (0,), "shutil.make_archive": (0,), "shutil.unpack_archive": (1,)}
    _READ_EVENTS = {"os.listdir": 0, "os.scandir": 0, "os.getxattr": 0, "os.listxattr": 0}

    def _resolve(path):
        if isinstance(path, int) or path is None:
            return None  # an already-open descriptor (its opening was checked) or the default cwd
        try:
            p = _fspath(path)
        except TypeError:
            return ""
        if isinstance(p, bytes):
            p = p.decode(errors="surrogateescape")
        return _realpath(p if _isabs(p) else _join(_WORK, p))

    def _beneath(p, roots):
        return any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)

    def _inside(path):
        p = _resolve(path)
        return p is None or _beneath(p, (_WORK,)) or p in _ALLOWED_FILES

    def _readable(path):
        p = _resolve(path)
        return p is None or _beneath(p, _READ_ROOTS)

    def _deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def _audit(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS
            if writing and not _inside(path):
                _deny(f"writing {path!r} outside the sandbox directory")
            if not writing and not _readable(path):
                _deny(f"reading {path!r}")
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                if i < len(args) and not _inside(args[i]):
                    _deny(f"{event} on {args[i]!r} outside the sandbox directory")
        elif event in _READ_EVENTS:
            if args and not _readable(args[_READ_EVENTS[event]]):
                _deny(f"{event} of {args[0]!r}")
        elif event in _DENIED or event.startswith("ctypes."):
            _deny(event)

    sys.addaudithook(_audit)
    for _name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                  "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                  "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "execv", "execve",
                  "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl",
                  "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "popen"):
        setattr(os, _name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    # subprocess keeps its own handle on the C fork+exec, which raises no audit event: take it away too
    subprocess._fork_exec = None
    _posixsubprocess.fork_exec = None
    for _name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "_posixsubprocess", "multiprocessing"):
        sys.modules[_name] = None
    _applied.append("python-guards")

_report.write(json.dumps(_applied))
_report.close()
del _report, _applied
exec(compile(__CODE__, "<llm>", "exec"), {"__name__": "__main__"})
"""

ALL_LAYERS = ("netns", "landlock", "seccomp", "rlimits", "python-guards")
KERNEL_LAYERS = ("netns", "landlock", "seccomp", "rlimits")


def build_program(code: str, work_dir: str, report_path: str, maximum_memory_bytes: int | None,
                  layers: tuple[str, ...] = ALL_LAYERS) -> str:
    """The child's program: the guard prelude with the parameters as literals, then the user code."""
    unknown = set(layers) - set(ALL_LAYERS)
    if unknown:
        raise ValueError(f"unknown sandbox layer(s) {sorted(unknown)}; the layers are {ALL_LAYERS}")
    program = _PRELUDE
    for key, value in (("__WORK__", work_dir), ("__MEM__", maximum_memory_bytes), ("__FSIZE__", OUTPUT_LIMIT_BYTES),
                       ("__REPORT__", report_path), ("__LAYERS__", sorted(layers)), ("__CODE__", code)):
        program = program.replace(key, repr(value))  # __CODE__ last: the user code may contain the other keys
    return program


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (it leads its own session), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _last_line(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _execute(code: str, timeout: float, maximum_memory_bytes: int | None, *,
             layers: tuple[str, ...] = ALL_LAYERS) -> ExecutionResult:
    """execute_code with a choice of layers; leaving layers out is for tests that show one layer holds alone."""
    if not isinstance(code, str):
        raise TypeError(f"execute_code: code must be a str, got {type(code).__name__}")
    if timeout is None or timeout <= 0:
        raise ValueError(f"execute_code: timeout must be > 0 seconds, got {timeout!r}")
    # outer/ holds the captured output and the report, out of the child's reach; outer/work is its cwd.
    outer = tempfile.mkdtemp(prefix="speedrun-exec-")
    try:
        work = os.path.join(os.path.realpath(outer), "work")
        os.mkdir(work, 0o700)
        report = os.path.join(outer, "sandbox.json")
        out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
        program = build_program(code, work, report, maximum_memory_bytes, layers)
        argv = [sys.executable, "-B", "-c", program]
        if len(program) > MAX_ARG_CHARS:
            program_path = os.path.join(outer, "program.py")
            with open(program_path, "w", encoding="utf-8") as f:
                f.write(program)
            argv = [sys.executable, "-B", program_path]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=work, env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, close_fds=True)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return ExecutionResult(success=False, stdout="", stderr="", error=TIMEOUT_ERROR, timeout=True,
                                       sandbox=tuple(json.loads(_read(report) or "[]")))
            _kill_group(proc)  # nothing may outlive the call (the child cannot fork, this is belt and braces)
        stdout, stderr = _read(out_path), _read(err_path)
        success = returncode == 0
        error = None if success else (_last_line(stderr) or "Execution failed")
        return ExecutionResult(success=success, stdout=stdout, stderr=stderr, error=error,
                               memory_exceeded="MemoryError" in stderr,
                               sandbox=tuple(json.loads(_read(report) or "[]")))
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def execute_code(code: str, timeout: float = 5.0,
                 maximum_memory_bytes: int | None = 256 * 1024 * 1024) -> ExecutionResult:
    """Run `code` in the sandbox described in the module docstring; success iff it exits with status 0."""
    return _execute(code, timeout, maximum_memory_bytes)
