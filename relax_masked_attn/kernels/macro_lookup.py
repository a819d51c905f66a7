"""A faster way for TVMScript macros to find their parser while our kernel generators run.

apache-tvm 0.27's ``ScriptMacro._find_parser_def`` (``tvm/script/parser/core/parser.py``)
finds the parser of the function being parsed through ``inspect.getouterframes``, which reads
the source line of every frame on the stack (``findsource``, then ``getmodule`` over
``sys.modules``) at every macro call: 45% of the time it takes to generate a dense kernel
(cProfile: 0.79 of 1.39 s). Walking ``frame.f_back`` and reading the same ``f_globals`` finds
the same parser, the first frame's that holds it, without reading any source.

The replacement is in place only while a generator runs (:func:`quick_macro_lookup`; nested and
concurrent generators share it through a count under a lock), and only where TVM's class has
the method and attribute it stands in for.
"""

from __future__ import annotations

import contextlib
import sys
import threading

_lock = threading.Lock()
_users = 0
_original = None


def _find_parser_by_frames(self):
    """``ScriptMacro._find_parser_def`` without source lookups: the parser in the globals of the
    nearest frame that has one."""
    name = type(self).parser_object_name
    frame = sys._getframe(0)
    while frame is not None:
        parser = frame.f_globals.get(name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{name} not available")


def _script_macro():
    """TVM's ``ScriptMacro`` when it has what :func:`_find_parser_by_frames` replaces."""
    try:
        from tvm.script.parser.core.parser import ScriptMacro
    except ImportError:
        return None
    if hasattr(ScriptMacro, "_find_parser_def") and hasattr(ScriptMacro, "parser_object_name"):
        return ScriptMacro
    return None


@contextlib.contextmanager
def quick_macro_lookup():
    """Within the block, TVMScript macros find their parser by walking frames."""
    global _users, _original
    macro = _script_macro()
    if macro is None:
        yield
        return
    with _lock:
        if _users == 0:
            _original = macro._find_parser_def
            macro._find_parser_def = _find_parser_by_frames
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                macro._find_parser_def = _original
