"""The Python-level guard of the code sandbox: an audit hook (PEP 578) against side effects.

Runs inside the sandbox. It refuses sockets, new processes, writes outside the work folder, reading /proc, and
the modules that would let code step around it (ctypes and friends, native modules from outside the standard
library). PEP 578 says plainly that audit hooks are no sandbox, and this one is not relied on as one: the verdict
is decided by another process (see ``_sandbox_judge``) and the OS layers (``_sandbox_os``) bound what code can
touch. The guard is the only write/network defence where the machine refuses namespaces, and a first, cheap,
line where it does not. Everything the hook consults is bound in its closure, so rebinding this module's
globals does not disarm it.
"""

import os

SPAWN_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "pty.spawn", "os.kill", "os.killpg",
})
BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "_testcapi", "_testinternalcapi", "_testmultiphase",
                             "_posixsubprocess", "multiprocessing", "_multiprocessing"})
PATH_ARG_EVENTS = {  # event -> positions of path arguments that are written
    "os.mkdir": (0,), "os.rmdir": (0,), "os.remove": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
    "os.chdir": (0,), "os.chroot": (0,), "shutil.rmtree": (0,),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
WRITABLE_DEVICES = ("/dev/null",)


def make_hook(work, allowed_ext_roots):
    """The audit hook for a process whose writes must stay in ``work`` and whose native modules must come from
    ``allowed_ext_roots`` (path prefixes of the standard library)."""
    spawn_events, blocked_modules = SPAWN_EVENTS, BLOCKED_MODULES
    path_events, realpath, fsdecode, write_flags = dict(PATH_ARG_EVENTS), os.path.realpath, os.fsdecode, WRITE_FLAGS
    devices, work_prefix, str_, bytes_, int_, tuple_ = WRITABLE_DEVICES, work + os.sep, str, bytes, int, tuple

    def inside(path):
        if isinstance(path, int_) or path is None:
            return True  # an fd we already hold
        try:
            full = realpath(fsdecode(path) if not isinstance(path, str_) else path)
        except (OSError, ValueError):
            return False  # a path too long to resolve is not known to be inside
        return full == work or full.startswith(work_prefix) or full in devices

    def hook(event, args):
        if event.startswith(("ctypes.", "socket.")) or event in spawn_events:  # every ctypes event, not a list
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            if args[0] in blocked_modules or str_(args[0]).rpartition(".")[2] in blocked_modules:
                raise ImportError(f"sandbox: module {args[0]} is not allowed")
            if args[1] is not None and not str_(args[1]).startswith(allowed_ext_roots):
                raise ImportError(f"sandbox: native module {args[1]} is not allowed")
        elif event == "open":
            path, mode, flags = args
            spelled = fsdecode(path) if isinstance(path, bytes_) else path
            if isinstance(spelled, str_) and (spelled == "/proc" or spelled.startswith("/proc/")):
                raise PermissionError(f"sandbox: open {spelled} is not allowed")
            writes = any(c in mode for c in "wax+") if isinstance(mode, str_) else bool(flags & write_flags)
            if writes and not inside(path):
                raise PermissionError(f"sandbox: writing {path} is not allowed")
        else:
            for i in path_events.get(event, tuple_()):
                if not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} {args[i]} is not allowed")

    return hook


def install(work, sys):
    """Add the hook (it cannot be removed), after dropping ctypes from ``sys.modules`` so that importing it
    again raises the audited "import" event."""
    work_dir = work.rstrip("/") + "/"
    roots = tuple({p.rstrip("/") + "/" for p in sys.path if p and not work_dir.startswith(p.rstrip("/") + "/")})
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        sys.modules.pop(name, None)
    sys.addaudithook(make_hook(work, roots or ("/nonexistent/",)))
