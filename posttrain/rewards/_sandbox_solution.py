"""The solution's side of the code sandbox: run the untrusted code, then answer the judge's requests.

Runs inside the sandbox, in the process that runs the completion's code (its own uid, confined by
``_sandbox_os``). Nothing here is trusted: the code may rewrite this module, the codec or the interpreter, and
may write anything on the reply pipe. That is the point of the design. This process never holds the tests, the
expected values or the verdict's channel; all it can do is answer requests, and ``_sandbox_judge`` (another
process) checks every answer itself. The references below are bound before the code runs only so that code which
legitimately patches ``json``, ``sys.stdout`` or a builtin does not break the protocol (and a correct answer with
it): this module's own code runs with the builtins as they were before the code ran, the code's with its own.

Requests (one JSON object a line, each with the judge's per-call ``id``, echoed in the reply):
- ``{"op": "names", "names": [...]}``: the module-level values of those names that the solution defines;
- ``{"op": "call", "h": handle, "args": [...], "kwargs": {...}}``: call an object of the solution's;
- ``{"op": "getattr", "h": handle, "name": "..."}``: read an attribute (never a dunder) of one.
Replies: ``{"id", "ok": value, "back": [...]}`` (``back``: the new contents of list/dict/set/bytearray arguments,
which a call may have mutated in place) or ``{"id", "err": [type name, message]}``.
"""

import builtins
import os
import sys

import _sandbox_codec as codec

MUTABLE = (list, dict, set, bytearray)


class Table:
    """The solution's objects the judge holds a handle to, by index; the same object gets the same handle."""

    def __init__(self):
        self.objects, self.index = [], {}

    def handle(self, obj):
        key = id(obj)  # stable: the table keeps every object it hands out alive
        if key not in self.index:
            self.index[key] = len(self.objects)
            self.objects.append(obj)
        return [self.index[key], type(obj).__name__[:60]]

    def resolve(self, h):
        if type(h) is not list or not h or type(h[0]) is not int or not 0 <= h[0] < len(self.objects):
            raise codec.CodecError("unknown handle")
        return self.objects[h[0]]


def _export(value, table):
    """A module-level value for the judge: a module by name (the judge imports its own copy), else data."""
    if type(value) is type(os):
        return ["m", str(getattr(value, "__name__", ""))]
    return ["v", codec.encode(value, table.handle)]


class Builtins:
    """Swaps the builtins between the code's version of them and the pristine one this module needs."""

    def __init__(self):
        self.table, self.update, self.clear = vars(builtins), dict.update, dict.clear
        self.pristine, self.theirs = dict(self.table), None

    def ours(self):
        self.theirs = dict(self.table)
        self.clear(self.table)
        self.update(self.table, self.pristine)

    def code(self):
        self.clear(self.table)
        self.update(self.table, self.theirs)


def _call(target, args, kwargs, swap):
    swap.code()
    try:
        return target(*args, **kwargs)
    finally:
        swap.ours()


def _answer(request, module, table, swap):
    op = request.get("op")
    if op == "names":
        names = [n for n in request.get("names", []) if type(n) is str and n in module.__dict__]
        return {"ok": {n: _export(module.__dict__[n], table) for n in names}}
    target = table.resolve(request.get("h"))
    if op == "getattr":
        name = request.get("name")
        if type(name) is not str or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(f"attribute {name!r} is not available across the sandbox")
        return {"ok": codec.encode(_call(getattr, (target, name), {}, swap), table.handle)}
    if op != "call":
        raise ValueError(f"unknown request {op!r}")
    args = [codec.decode(a, table.resolve) for a in request.get("args", [])]
    kwargs = {str(k): codec.decode(v, table.resolve) for k, v in request.get("kwargs", {}).items()}
    result = codec.encode(_call(target, args, kwargs, swap), table.handle)
    back = [codec.encode(a, table.handle) if type(a) in MUTABLE else None for a in args]
    kwback = {k: codec.encode(v, table.handle) for k, v in kwargs.items() if type(v) in MUTABLE}
    return {"ok": result, "back": back, "kwback": kwback}


def _write_all(write, fd, data):
    while data:
        data = data[write(fd, data):]


def serve(source, requests_fd, replies_fd):
    """Run ``source`` as ``__main__``, then answer requests until the judge closes the channel."""
    read, write, dumps, exit_ = os.read, os.write, codec.dumps, os._exit
    streams, base_exception, type_, str_ = (sys.stdout, sys.stderr), BaseException, type, str
    module = type(sys)("__main__")
    sys.modules["__main__"] = module
    swap = Builtins()
    try:
        exec(compile(source, "<solution>", "exec", dont_inherit=True, optimize=0), module.__dict__)
    except base_exception:
        swap.ours()
        import traceback  # only now: importing it costs every run its start-up time

        traceback.print_exc()
        _flush(streams)
        exit_(1)
    swap.ours()
    _flush(streams)
    table, reader = Table(), codec.Reader(requests_fd, read)
    while True:
        try:
            request = reader.message()
        except EOFError:
            exit_(0)
        try:
            reply = _answer(request, module, table, swap)
        except base_exception as e:  # SystemExit from a function too: the judge sees an error, never an exit
            reply = {"err": [type_(e).__name__, str_(e)[:1000]]}
        reply["id"] = request.get("id")
        _flush(streams)  # the judge may end the run right after this answer: keep the code's prints for the logs
        try:
            _write_all(write, replies_fd, dumps(reply))
        except (TypeError, ValueError) as e:
            _write_all(write, replies_fd, dumps({"id": request.get("id"), "err": ["ValueError", str(e)[:200]]}))


def _flush(streams):
    for stream in streams:
        try:
            stream.flush()
        except BaseException:
            pass
