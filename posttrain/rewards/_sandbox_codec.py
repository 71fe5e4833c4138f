"""Plain data across the code sandbox's channel between the solution's process and the judge's.

Runs inside the sandbox (copied next to the harness; standard library only). Both directions use one format:
newline-delimited JSON in which JSON scalars are themselves (None, bool, int, float, str) and every container is
a one-key object naming its exact type (``{"l": [...]}`` a list, ``{"t": ...}`` a tuple, ``{"d": [[k, v], ...]}``
a dict ...), so that a tuple stays a tuple, a set a set, and a dict may have tuple keys.

What the judge decodes is always built by the judge from these tags: built-in types with built-in ``__eq__``,
never an object of the solution's making, so an "always equal" object cannot cross. Anything that is not plain
data becomes a handle (an index into the solution's table of objects) that the judge can only call or read an
attribute of; see ``_sandbox_judge.Remote``.
"""

MAX_DEPTH = 100  # nesting of one value
MAX_ITEMS = 1_000_000  # scalars and containers in one message
MAX_MESSAGE = 16 << 20  # bytes of one message
MAX_ITERATOR = 100_000  # items drawn from an iterator the solution returns


class CodecError(ValueError):
    """A value that cannot cross, or a message that breaks the format."""


def _native_type(value):
    """The plain type ``value`` encodes as (subclasses of int, str, list ... as their base), or None."""
    for base in (bool, int, float, str, bytes, bytearray, complex, list, dict, set, frozenset, range):
        if isinstance(value, base):
            return base
    if isinstance(value, tuple):
        return "namedtuple" if isinstance(getattr(type(value), "_fields", None), tuple) else tuple
    kind = (type(value).__module__, type(value).__name__)
    if kind in (("fractions", "Fraction"), ("decimal", "Decimal")):
        return kind[1]
    if hasattr(type(value), "__next__") and hasattr(type(value), "__iter__"):
        return "iterator"  # a generator or map object: its items, not the object
    return None


def encode(value, handle, depth=0, budget=None):
    """A JSON-able tree for ``value``; ``handle(obj)`` stands for what is not plain data (or raises)."""
    budget = budget if budget is not None else [MAX_ITEMS]
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise CodecError("value too large or too deeply nested to cross the sandbox")
    kind = _native_type(value)
    sub = lambda items: [encode(v, handle, depth + 1, budget) for v in items]  # noqa: E731
    if value is None or kind is bool:  # bool cannot be subclassed
        return value
    if kind in (int, float, str):
        return kind(value) if type(value) is not kind else value
    if kind in (bytes, bytearray):
        return {"b" if kind is bytes else "y": bytes(value).hex()}
    if kind is complex:
        return {"c": [complex(value).real, complex(value).imag]}
    if kind is range:
        return {"r": [value.start, value.stop, value.step]}
    if kind in ("Fraction", "Decimal"):
        return {"q": [value.numerator, value.denominator]} if kind == "Fraction" else {"D": str(value)}
    if kind == "namedtuple":
        fields = [str(f) for f in type(value)._fields]
        return {"n": [type(value).__name__, fields, sub(tuple(value))]}
    if kind == "iterator":
        items = []
        for item in value:
            if len(items) >= MAX_ITERATOR:
                raise CodecError(f"an iterator of more than {MAX_ITERATOR} items cannot cross the sandbox")
            items.append(item)
        return {"i": sub(items)}
    if kind is dict:
        return {"d": [[encode(k, handle, depth + 1, budget), encode(v, handle, depth + 1, budget)]
                      for k, v in dict.items(value)]}
    tags = {tuple: "t", list: "l", set: "s", frozenset: "z"}
    if kind in tags:
        return {tags[kind]: sub(kind(value))}
    return {"h": handle(value)}


def _build_namedtuple(name, fields, cache={}):  # noqa: B006 (a per-process cache of the classes made)
    key = (name, tuple(fields))
    if key not in cache:
        import collections

        cache[key] = collections.namedtuple(name if name.isidentifier() else "Row", fields, rename=True)
    return cache[key]


def decode(tree, remote, depth=0):
    """The value a tree encodes; ``remote(h)`` turns a handle into the receiver's stand-in for it."""
    if depth > MAX_DEPTH:
        raise CodecError("value too deeply nested")
    if tree is None or type(tree) in (bool, int, float, str):
        return tree
    if type(tree) is not dict or len(tree) != 1:
        raise CodecError(f"not a value of the sandbox's format: {type(tree).__name__}")
    (tag, body), = tree.items()
    sub = lambda items: [decode(v, remote, depth + 1) for v in _list(items)]  # noqa: E731
    if tag in ("l", "t", "s", "z", "i"):
        return {"l": list, "t": tuple, "s": set, "z": frozenset, "i": iter}[tag](sub(body))
    if tag == "d":
        return {decode(k, remote, depth + 1): decode(v, remote, depth + 1) for k, v in map(_pair, _list(body))}
    if tag in ("b", "y"):
        return (bytes if tag == "b" else bytearray).fromhex(_str(body))
    if tag == "c":
        return complex(*map(float, _list(body)[:2]))
    if tag == "r":
        return range(*(int(v) for v in _list(body)[:3]))
    if tag == "q":
        import fractions

        return fractions.Fraction(*(int(v) for v in _list(body)[:2]))
    if tag == "D":
        import decimal

        return decimal.Decimal(_str(body))
    if tag == "n":
        name, fields, items = _list(body)[:3]
        return _build_namedtuple(_str(name), [_str(f) for f in _list(fields)])(*sub(items))
    if tag == "h":
        return remote(body)
    raise CodecError(f"unknown tag {tag!r}")


def _list(body):
    if type(body) is not list:
        raise CodecError("malformed container")
    return body


def _str(body):
    if type(body) is not str:
        raise CodecError("malformed string")
    return body


def _pair(item):
    if type(item) is not list or len(item) != 2:
        raise CodecError("malformed dict item")
    return item


class _Scanning:
    """What ``_json.make_scanner`` reads off its context: plain JSON, NaN and infinities allowed."""

    strict, object_hook, object_pairs_hook, parse_float, parse_int = True, None, None, float, int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__


def _not_json(obj):
    raise TypeError(f"{type(obj).__name__} is not JSON")


# The C half of the json package, without json itself: importing json costs a run ~7 ms of start-up (it pulls in
# re and enum), paid by every sample. The format is identical; json is the fallback where _json is missing.
try:
    import _json

    _scan = _json.make_scanner(_Scanning())
    _encode = _json.make_encoder(None, _not_json, _json.encode_basestring_ascii, None, ":", ",", False, False, True)

    def loads(text):
        text = text.decode() if isinstance(text, (bytes, bytearray)) else text
        try:
            value, end = _scan(text, 0)
        except StopIteration as e:
            raise CodecError(f"malformed JSON at {e.value}") from None
        if text[end:].strip():
            raise CodecError("trailing data after JSON")
        return value

    def dumps_text(obj) -> str:
        return "".join(_encode(obj, 0))
except (ImportError, AttributeError):
    import json

    loads = json.loads

    def dumps_text(obj) -> str:
        return json.dumps(obj, separators=(",", ":"))


def dumps(message) -> bytes:
    return dumps_text(message).encode() + b"\n"


class Reader:
    """Newline-delimited messages from a pipe, each at most MAX_MESSAGE bytes."""

    def __init__(self, fd, read):
        self.fd, self.read, self.buffer = fd, read, bytearray()

    def message(self):
        end = self.buffer.find(b"\n")
        while end < 0:
            if len(self.buffer) > MAX_MESSAGE:
                raise CodecError("message over the size limit")
            chunk = self.read(self.fd, 1 << 16)
            if not chunk:
                raise EOFError("the other side of the sandbox channel closed it")
            found = chunk.find(b"\n")
            end = -1 if found < 0 else len(self.buffer) + found
            self.buffer += chunk
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        if len(line) > MAX_MESSAGE:
            raise CodecError("message over the size limit")
        message = loads(line)
        if type(message) is not dict:
            raise CodecError("a message must be an object")
        return message
