"""How payloads and values are kept in a journal: fingerprints, JSON text, pickles.

A payload is kept only as a fingerprint (enough to notice that a source changed between runs);
a value as JSON (what ``batchpool results`` exports) and, for a sink's replay, pickled too.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from typing import Any

_ATOMS = (str, int, float, bool, bytes, type(None))
_DICT, _SET, _FROZENSET = "\x00bp:dict", "\x00bp:set", "\x00bp:frozenset"


def _dumps(obj: Any) -> bytes:
    """Pickle without the memo, so equal values give equal bytes whatever objects they share."""
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=4)
    pickler.fast = True  # no memo: cyclic objects raise ValueError instead
    pickler.dump(obj)
    return buf.getvalue()


def _canonical(obj: Any) -> Any:
    """Equal plain containers in one canonical shape: dict items and set members sorted."""
    kind = type(obj)
    if kind in _ATOMS:
        return obj
    if kind is list:
        return [_canonical(x) for x in obj]
    if kind is tuple:
        return tuple(_canonical(x) for x in obj)
    if kind is dict:
        items = [(_canonical(k), _canonical(v)) for k, v in obj.items()]
        return (_DICT, sorted(items, key=lambda kv: _dumps(kv[0])))
    if kind is set or kind is frozenset:
        tag = _SET if kind is set else _FROZENSET
        return (tag, sorted((_canonical(x) for x in obj), key=_dumps))
    return obj


def fingerprint(payload: Any) -> str:
    """Stable short hex digest of a payload, to detect that a source changed between runs.

    Plain dicts, sets and frozensets (nested in lists/tuples/dicts) are made canonical first, so
    their iteration order (hash randomisation) does not matter, and pickling skips the memo, so
    object identity does not either. Sets hidden inside other objects (custom classes, dict
    subclasses) may still fingerprint differently across interpreter runs. A payload that cannot
    be pickled at all fingerprints by its type name: a change to it goes unnoticed.
    """
    try:
        data = _dumps(_canonical(payload))
    except (RecursionError, ValueError):  # cyclic or very deep: plain pickle, memo and all
        try:
            data = pickle.dumps(payload, protocol=4)
        except Exception:
            data = _unpicklable(payload)
    except Exception:
        data = _unpicklable(payload)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _unpicklable(payload: Any) -> bytes:
    kind = type(payload)
    return f"unpicklable:{kind.__module__}.{kind.__qualname__}".encode()


def json_text(value: Any) -> str:
    """JSON text; parts JSON cannot hold become their repr(), the whole value if need be."""
    if value is None:
        return "null"
    try:
        return _ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError):  # non-str dict keys, cycles
        return json.dumps(_safe_repr(value))


def pickled(value: Any) -> bytes | None:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # it crossed from a worker, so it pickles; if not, JSON will have to do
        return None


def unpickled(data: bytes | None, text: str | None) -> Any:
    """The kept object, or the JSON form where there is none or it no longer loads (a class
    renamed since)."""
    if data is not None:
        try:
            return pickle.loads(data)
        except Exception:
            pass
    return None if text is None else json.loads(text)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__qualname__}>"


_ENCODER = json.JSONEncoder(default=_safe_repr)  # one instance: json.dumps(default=) builds one
