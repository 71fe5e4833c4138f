"""A seccomp filter for the code sandbox's processes, built and installed with ctypes (no libseccomp needed).

Runs inside the sandbox. Denied with EPERM: the system calls that reach the kernel's wider attack surface or
out of the sandbox — keyrings (the trainer's session keyring), namespaces (unshare, setns, clone with a
namespace flag), io_uring, perf_event_open, bpf, userfaultfd, ptrace and cross-process memory access, mounts,
module loading, kexec, reboot, swap, handles by inode (open_by_handle_at), fanotify; socket(AF_UNIX), so that no
pathname socket of the host can be reached even where its filesystem is visible; and terminal injection
(TIOCSTI, TIOCLINUX). clone3 gets ENOSYS, which makes the C library fall back to clone, whose flags the filter
can read (clone3 passes them in memory, out of a filter's reach). A foreign architecture (x32 or i386 system
calls on x86_64) kills the process.
"""

import os
import sys

# nr per architecture: x86_64, aarch64. New calls (>= 424) have one number everywhere.
DENIED = {
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "perf_event_open": (298, 241), "bpf": (321, 280),
    "userfaultfd": (323, 282), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106), "reboot": (169, 142),
    "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "fanotify_init": (300, 262), "kcmp": (312, 272), "quotactl": (179, 60),
    "personality": (135, 92), "lookup_dcookie": (212, 18),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "pidfd_getfd": (438, 438), "mount_setattr": (442, 442),
}
X86_ONLY = {"iopl": 172, "ioperm": 173, "modify_ldt": 154}
CLONE, SOCKET, IOCTL, CLONE3 = (56, 220), (41, 198), (16, 29), (435, 435)
ARCHES = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}  # column in the tables, AUDIT_ARCH_*
CLONE_NS_FLAGS = 0x00020000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x08000000 | 0x04000000 | 0x02000000
AF_UNIX, TIOCSTI, TIOCLINUX = 1, 0x5412, 0x541C
EPERM, ENOSYS = 1, 38
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
OFF_NR, OFF_ARCH = 0, 4
OFF_ARG = lambda i: 16 + 8 * i  # noqa: E731  (low 32 bits of argument i on a little-endian machine)


def _op(code, k, jt=0, jf=0):
    return (code, jt, jf, k)


def _arg_rule(nr, arg, test, value):
    """EPERM when the call is ``nr`` and argument ``arg`` passes ``test`` (JEQ or JSET against ``value``); else
    fall through to the next rule with the call number reloaded into the accumulator."""
    return [_op(JEQ, nr, 0, 3), _op(LD_ABS, OFF_ARG(arg)), _op(test, value, 0, 1),
            _op(RET, RET_ERRNO | EPERM), _op(LD_ABS, OFF_NR)]


def program(machine=None):
    """The filter for this machine as (code, jt, jf, k) tuples, or None for an architecture it does not know."""
    machine = machine or os.uname().machine
    if machine not in ARCHES:
        return None
    col, audit_arch = ARCHES[machine]
    prog = [_op(LD_ABS, OFF_ARCH), _op(JEQ, audit_arch, 1, 0), _op(RET, RET_KILL_PROCESS), _op(LD_ABS, OFF_NR)]
    if machine == "x86_64":
        prog += [_op(JGE, 0x40000000, 0, 1), _op(RET, RET_KILL_PROCESS)]  # the x32 ABI's numbers
    numbers = [nrs[col] for nrs in DENIED.values()] + (list(X86_ONLY.values()) if machine == "x86_64" else [])
    for nr in sorted(set(numbers)):
        prog += [_op(JEQ, nr, 0, 1), _op(RET, RET_ERRNO | EPERM)]
    prog += [_op(JEQ, CLONE3[col], 0, 1), _op(RET, RET_ERRNO | ENOSYS)]
    prog += _arg_rule(CLONE[col], 0, JSET, CLONE_NS_FLAGS) + _arg_rule(SOCKET[col], 0, JEQ, AF_UNIX)
    prog += _arg_rule(IOCTL[col], 1, JEQ, TIOCSTI) + _arg_rule(IOCTL[col], 1, JEQ, TIOCLINUX)
    return prog + [_op(RET, RET_ALLOW)]


def install(ctypes, libc):
    """Load the filter into this process (PR_SET_NO_NEW_PRIVS must be set). True, or False on an unknown
    architecture; raises OSError when the kernel refuses it."""
    prog = program()
    if prog is None:
        return False
    order = sys.byteorder  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}, native order (no struct import)
    raw = b"".join(c.to_bytes(2, order) + bytes((jt, jf)) + k.to_bytes(4, order) for c, jt, jf, k in prog)
    buffer = ctypes.create_string_buffer(raw, len(raw))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buffer))
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter refused: errno {err}")
    return True
