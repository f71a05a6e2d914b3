"""The engine's parts share one declared interface (p2pkv._engine.base._EngineBase).

mypy checks each part against the declarations; what it cannot see is a declaration that no part
implements (it would fail only when called), one that two parts implement (the class order would pick
one silently) or a declared attribute that Engine.__init__ no longer sets. These tests check that.
"""

import ast
import inspect
import textwrap
from pathlib import Path

import p2pkv._engine.base as base
from p2pkv._engine.base import _EngineBase
from p2pkv.engine import Engine


def _declared_methods() -> dict[str, ast.FunctionDef]:
    tree = ast.parse(Path(base.__file__).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_EngineBase")
    out = {}
    for node in cls.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            out.update({f.name: f for f in node.body if isinstance(f, ast.FunctionDef)})
    return out


def _shape(args: ast.arguments) -> list[tuple[str, str, str | None]]:
    """(name, kind, default) of each parameter, as written in the source."""
    pos = args.posonlyargs + args.args
    defaults = [None] * (len(pos) - len(args.defaults)) + [ast.unparse(d) for d in args.defaults]
    out = [(a.arg, "positional", d) for a, d in zip(pos, defaults, strict=True)]
    if args.vararg:
        out.append((args.vararg.arg, "*", None))
    out += [(a.arg, "keyword", None if d is None else ast.unparse(d))
            for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    if args.kwarg:
        out.append((args.kwarg.arg, "**", None))
    return out


def test_every_declared_method_is_implemented_by_exactly_one_part_with_the_declared_parameters():
    declared = _declared_methods()
    assert len(declared) > 50  # the parser found the block
    parts = [c for c in Engine.__mro__ if c not in (_EngineBase, object)]
    for name, decl in declared.items():
        owners = [c for c in parts if name in vars(c)]
        assert len(owners) == 1, f"{name} is implemented by {[c.__name__ for c in owners]}"
        impl = inspect.unwrap(vars(owners[0])[name])
        impl = getattr(impl, "__func__", impl)  # staticmethod
        src = ast.parse(textwrap.dedent(inspect.getsource(impl))).body[0]
        assert isinstance(src, ast.FunctionDef)
        assert _shape(src.args) == _shape(decl.args), f"{owners[0].__name__}.{name} differs from its declaration"
        assert isinstance(vars(owners[0])[name], staticmethod) == any(
            ast.unparse(d) == "staticmethod" for d in decl.decorator_list), name


def test_every_declared_attribute_is_set_on_a_new_engine():
    with Engine() as eng:
        missing = [n for n in _EngineBase.__annotations__ if not hasattr(eng, n)]
    assert not missing, f"declared in _EngineBase but not set by Engine.__init__: {missing}"
