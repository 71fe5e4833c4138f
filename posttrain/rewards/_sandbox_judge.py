"""The judge of the code sandbox: runs the tests in a process the solution has never touched.

Runs inside the sandbox, in its own process and uid, forked before any untrusted code ran and never running any
(``_sandbox_child`` forks it). The tests execute here, in a fresh scope with this interpreter's own builtins and
standard library; every name the tests use that the solution defines is bound to a stand-in:
- plain data (numbers, strings, lists, dicts, tuples, sets ... see ``_sandbox_codec``) is copied in;
- anything else (functions, classes, instances) is a ``Remote``: calling it or reading an attribute of it asks
  the solution's process over a pipe, with a per-call secret, and the answer is decoded here into plain data or
  another ``Remote``.
So ``assert f(2) == 4`` sends ``2`` and compares here; the expected ``4`` never leaves this process. Patching
builtins, ``math``, ``unittest`` or ``__eq__`` in the solution changes nothing here, module-level names that
shadow builtins (``abs``, ``len``) are not bound, and a ``Remote`` has no truth value, order or iteration of its
own: only data the judge built itself is compared. The verdict is this process's exit status (0: the tests ran
to completion), read by the harness with waitpid: nothing the solution prints or writes is ever taken for it.

Supported tests: any Python that calls the solution's functions and classes with data and checks what they return
(``assert`` statements, ``def check(candidate)`` + ``check(f)``, loops, helpers). Not supported (such tests fail):
passing a function or one of the tests' own objects to the solution, and in-place mutation beyond the top level
of a list/dict/set/bytearray argument (those are copied back after each call).
"""

import builtins
import os
import sys

import _sandbox_codec as codec


class SolutionError(Exception):
    """The solution raised an exception that is not one of the built-in ones (its name and message)."""


class ChannelError(RuntimeError):
    """The solution's process answered out of protocol, or not at all."""


class Remote:
    """Stands for an object that lives in the solution's process. It can be called and its attributes read (each
    a round trip); equality is identity of the remote object. No truth value, no order, no iteration, no length:
    a test can only judge what the solution returns once it is plain data built here."""

    __slots__ = ("_h", "_channel")

    def __init__(self, h, channel):
        object.__setattr__(self, "_h", h)
        object.__setattr__(self, "_channel", channel)

    def __call__(self, *args, **kwargs):
        return self._channel.call(self, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._channel.request_value("getattr", h=self._h, name=name)

    def __setattr__(self, name, value):
        raise TypeError("objects of the solution cannot be modified from the tests")

    def __bool__(self):
        raise TypeError(f"a {self._h[1]} returned by the solution is not data: it has no truth value here")

    def __eq__(self, other):
        return isinstance(other, Remote) and other._h[0] == self._h[0]

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(("remote", self._h[0]))

    def __repr__(self):
        return f"<{self._h[1]} of the solution's, #{self._h[0]}>"


def _remote_error(err):
    """The exception to raise here for the solution's: a built-in Exception subclass of that name, else
    SolutionError (never SystemExit or another BaseException)."""
    name, message = (list(err) + ["", ""])[:2] if isinstance(err, list) else ("?", "")
    cls = getattr(builtins, str(name), None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(str(message))
        except Exception:
            pass
    return SolutionError(f"{name}: {message}")


class Channel:
    def __init__(self, replies_fd, requests_fd):
        self.reader, self.fd = codec.Reader(replies_fd, os.read), requests_fd

    def request(self, op, **fields):
        call_id = os.urandom(8).hex()  # an answer must name the question it answers
        data = codec.dumps({"id": call_id, "op": op, **fields})
        try:
            while data:
                data = data[os.write(self.fd, data):]
            reply = self.reader.message()
        except (EOFError, BrokenPipeError):
            raise ChannelError("the solution's process ended before answering") from None
        if reply.get("id") != call_id:
            raise ChannelError("the solution's process answered out of turn")
        if "err" in reply:
            raise _remote_error(reply["err"])
        return reply

    def request_value(self, op, **fields):
        return codec.decode(self.request(op, **fields).get("ok"), self.remote)

    def remote(self, h):
        if type(h) is not list or len(h) != 2 or type(h[0]) is not int or type(h[1]) is not str:
            raise codec.CodecError("malformed handle")
        return Remote(h, self)

    def own(self, obj):
        if isinstance(obj, Remote):
            return obj._h
        raise TypeError(f"a {type(obj).__name__} cannot be passed to the solution: only data, and objects the "
                        "solution returned, cross the sandbox")

    def call(self, target, args, kwargs):
        reply = self.request("call", h=target._h, args=[codec.encode(a, self.own) for a in args],
                             kwargs={k: codec.encode(v, self.own) for k, v in kwargs.items()})
        result = codec.decode(reply.get("ok"), self.remote)
        backs = list(zip(args, reply.get("back") or [])) + [
            (kwargs[k], tree) for k, tree in (reply.get("kwback") or {}).items() if k in kwargs]
        for original, tree in backs:
            if tree is not None and type(original) in (list, dict, set, bytearray):
                _update(original, codec.decode(tree, self.remote))
        return result


def _update(original, new):
    """Give an argument the contents the solution left in it (a call by reference, one level deep)."""
    if type(new) is not type(original):
        return
    if isinstance(original, (list, bytearray)):
        original[:] = new
    else:
        original.clear()
        original.update(new)


def _bind(scope, wanted, exported, channel):
    for name, entry in exported.items():
        if name not in wanted or type(entry) is not list or len(entry) != 2:
            continue
        kind, value = entry
        if kind == "m":  # a module the solution imported: the tests get the judge's own, unpatched copy
            if value == name and name in sys.stdlib_module_names:
                scope[name] = __import__(name)
        elif kind == "v":
            scope[name] = codec.decode(value, channel.remote)


def run(tests_source, replies_fd, requests_fd):
    """Run the tests against the solution; exit 0 when they ran to completion, 1 otherwise."""
    try:
        code = compile(tests_source, "<tests>", "exec", dont_inherit=True, optimize=0)
        wanted = sorted(_global_names(code) - set(vars(builtins)))
        channel = Channel(replies_fd, requests_fd)
        scope = {"__name__": "__main__", "__builtins__": builtins}
        _bind(scope, set(wanted), channel.request("names", names=wanted).get("ok") or {}, channel)
        exec(code, scope)
    except BaseException as e:
        _flush()
        _report(e, tests_source)
        os._exit(1)
    _flush()
    os._exit(0)


def _global_names(code):
    """Every name the tests' code objects load (globals and attribute names alike: asking for a few names too
    many is harmless), without importing ast, which would cost every run its import time."""
    names, stack = set(), [code]
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if isinstance(c, type(code)))
    return names


def _report(error, source):
    """The failing test line and the exception, for the logs (the judge's own frames say nothing useful)."""
    try:
        import traceback

        lines, text = source.splitlines(), ""
        where = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == "<tests>"]
        if where and 0 < where[-1].lineno <= len(lines):
            text = f"tests line {where[-1].lineno}: {lines[where[-1].lineno - 1].strip()[:500]}\n"
        sys.stderr.write(text + "".join(traceback.format_exception_only(type(error), error))[-2000:])
        sys.stderr.flush()
    except BaseException:
        pass


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
