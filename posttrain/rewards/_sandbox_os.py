"""OS-level confinement for the code sandbox: namespaces, mounts, Landlock, rlimits, uid, keyring, seccomp.

Runs inside the sandbox (copied next to the harness; standard library only). Two stages:
- ``enter_namespaces`` + ``private_filesystem``, once for the whole run, only when bubblewrap did not already
  build the run's private root: new mount, network, IPC, UTS and PID namespaces (directly as root, inside a user
  namespace otherwise); the host's filesystem read-only, the work folder a private size-limited tmpfs (nosuid,
  nodev, noexec) that the host never sees, /proc hidden;
- ``confine``, in each process that runs code (the solution's and the judge's, each with its own uid): rlimits,
  another uid, a fresh session keyring, no new privileges, Landlock, not dumpable, the seccomp filter.
"""

import os
import resource
import sys

import _sandbox_seccomp

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWUTS, CLONE_NEWPID = (
    0x00020000, 0x10000000, 0x40000000, 0x08000000, 0x04000000, 0x20000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
MS_OPTION_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                   "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}
KEYCTL_JOIN_SESSION_KEYRING = 1


def libc():
    """(ctypes, libc, call): ``call(name, *args)`` raises OSError when the C function returns non-zero."""
    import ctypes

    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long

    def call(name, *args):
        if getattr(lib, name)(*args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{name}: {os.strerror(err)}")

    return ctypes, lib, call


def _mounts():
    """(mount point, option flags) of every mount, parents first, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 for spaces
            flags = 0
            for opt in fields[5].split(","):
                flags |= MS_OPTION_FLAGS.get(opt, 0)
            out.append((point, flags))
    return out


def enter_namespaces(call, uid, gid):
    """New mount, network, IPC, UTS and PID namespaces: directly as root, inside a user namespace otherwise.
    None when the kernel refuses; a failure after unshare succeeded is raised (a half-made namespace). The PID
    namespace applies to the children forked from here on: the first becomes its init."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
    root = os.geteuid() == 0
    try:
        call("unshare", flags if root else flags | CLONE_NEWUSER)
    except OSError:
        return None
    if root:
        return "root"
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                       ("/proc/self/gid_map", f"{gid} {gid} 1")):
        with open(path, "w") as f:
            f.write(text)
    return "user namespace"


def private_filesystem(call, work, disk_bytes):
    """Everything read-only except the work folder, which becomes a private tmpfs of ``disk_bytes`` (nosuid,
    nodev, noexec; the host's folder stays empty, so nothing written reaches its disk); /proc hidden."""
    call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    options = f"size={disk_bytes},mode=1777".encode()
    call("mount", b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options)
    failed = []
    for point, flags in _mounts():
        if point == work or point == "/proc" or point.startswith("/proc/"):
            continue
        try:
            call("mount", None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)
        except OSError:
            failed.append(point)
    call("mount", b"tmpfs", b"/proc", b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k")
    # Only the folders anyone could write to matter; a failed remount of a root-only mount is harmless.
    for path in ("/", "/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(path) and not os.statvfs(path).f_flag & os.ST_RDONLY:
            raise OSError(f"{path} is still writable (remount failed for {failed})")


# Landlock (Linux >= 5.13, unprivileged): syscalls 444-446 on x86_64 and aarch64 alike; access bits per ABI version.
LANDLOCK_FS_BITS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
LANDLOCK_FILE_RIGHTS = 1 | 2 | 4 | (1 << 14) | (1 << 15)  # execute, write, read, truncate, ioctl: valid on a file
LANDLOCK_READ = 1 | 4 | 8  # execute, read file, read dir
LANDLOCK_SCOPES = 1 | 2  # abstract unix sockets and signals: none to processes outside the domain


def landlock(ctypes, lib, work, read_roots):
    """Confine the filesystem view to ``read_roots`` (read-only: the interpreter and its standard library) and
    ``work`` (read-write, not executable); deny TCP bind/connect (ABI >= 4), abstract unix sockets and signals
    to processes outside (ABI >= 6). The ABI version, or None without Landlock. Needs PR_SET_NO_NEW_PRIVS."""
    abi = lib.syscall(444, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return None
    fs = LANDLOCK_FS_BITS[max(v for v in LANDLOCK_FS_BITS if v <= abi)]
    attr = (ctypes.c_uint64 * 3)(fs, 3 if abi >= 4 else 0, LANDLOCK_SCOPES if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = lib.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    rules = [(root, LANDLOCK_READ & fs) for root in read_roots] + [("/dev/null", 2 | 4), (work, fs & ~1)]
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue  # a root this machine lacks (/lib64 on aarch64)
        try:
            if not os.path.isdir(path):
                access &= LANDLOCK_FILE_RIGHTS
            rule = PathBeneath(access, fd)
            if lib.syscall(445, ruleset, 1, ctypes.byref(rule), 0) != 0:  # LANDLOCK_RULE_PATH_BENEATH
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path} failed")
        finally:
            os.close(fd)
    if lib.syscall(446, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    os.close(ruleset)
    return abi


def interpreter_roots():
    """What the interpreter reads after start-up: its standard library (sys.path under -S) and system libraries."""
    roots = {os.path.realpath(p) for p in sys.path if p and os.path.exists(p)}
    roots |= {os.path.realpath(sys.base_prefix + "/lib"), "/usr/lib", "/lib", "/lib64", "/usr/lib64"}
    return sorted(roots)


def _set_limits(s, uid):
    limits = {
        resource.RLIMIT_CPU: (s["cpu_s"], s["cpu_s"] + 1),
        resource.RLIMIT_AS: (s["memory_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (s["file_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (64, 64),
        resource.RLIMIT_CORE: (0, 0),
    }
    if uid is not None:  # per-uid process count; meaningless (and harmful) when shared with the host's uid
        limits[resource.RLIMIT_NPROC] = (s["max_processes"],) * 2
    for kind, value in limits.items():
        resource.setrlimit(kind, value)


def _become(uid, ctypes, call, namespaced):
    """As root: an unused uid and gid, which drops every capability. Otherwise, inside our own user namespace,
    capset(2) to empty sets (unshare(CLONE_NEWUSER) gave us every capability there)."""
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        stdlib = os.path.dirname(os.__file__)
        if not os.access(stdlib, os.R_OK | os.X_OK):  # e.g. a pyenv under /root (0700): every import would fail
            raise PermissionError(f"uid {uid} cannot read the standard library at {stdlib}")
        return [f"unprivileged uid {uid}"]
    if namespaced:
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        call("capset", header, (ctypes.c_uint32 * 6)())
    return []


def _fresh_keyring(ctypes, lib):
    """Leave the session keyring inherited from the trainer (a uid change keeps it, and with it every key it
    holds) for a new, empty one. False where the kernel has no keyrings or its number is unknown here."""
    column = _sandbox_seccomp.ARCHES.get(os.uname().machine, (None,))[0]
    if column is None:
        return False
    return lib.syscall(_sandbox_seccomp.DENIED["keyctl"][column], KEYCTL_JOIN_SESSION_KEYRING, None) >= 0


def confine(s, uid, kit):
    """Confine this process (one that will run code) as far as the machine permits; the defences now active.
    ``uid``: the fresh uid to become (root only), ``kit``: what ``libc()`` returned."""
    ctypes, lib, call = kit
    _set_limits(s, uid)
    os.nice(19)  # lowest CPU priority, so that spinning processes cannot starve the host until the timeout
    defences = ["nice 19, rlimits cpu/as/fsize/nofile" + ("/nproc" if uid is not None else "")]
    defences += _become(uid, ctypes, call, bool(s.get("namespaces")))
    if _fresh_keyring(ctypes, lib):
        defences.append("fresh session keyring")
    call("prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary can give privileges back
    abi = landlock(ctypes, lib, s["work"], interpreter_roots()) if s["isolate"] else None
    if abi:
        defences.append(f"landlock v{abi}: no file outside the work folder and the standard library"
                        + (", no TCP" if abi >= 4 else "") + (", no signals out" if abi >= 6 else ""))
    call("prctl", 4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no same-uid process may ptrace us or read our memory
    if s["seccomp"] and _sandbox_seccomp.install(ctypes, lib):
        defences.append("seccomp: no keyctl, unshare, io_uring, perf_event_open, ptrace, bpf, mount, AF_UNIX")
    os.chdir(s["work"])
    return defences
