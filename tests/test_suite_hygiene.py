"""The suite itself: no assert that cannot fail, no skip waiting for a feature that has landed."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent

#: Calls whose result is a non-empty str/bytes (a digest, a hex string, a rendering): always truthy.
_ALWAYS_TRUTHY_CALLS = {"hexdigest", "digest", "hex", "fingerprint", "str", "repr", "format", "isoformat",
                        "file_sha256", "sha256", "read_bytes", "read_text", "to_json", "dumps"}


def _why_cannot_fail(test: ast.expr, module_names: set[str]) -> str | None:
    if isinstance(test, ast.Constant):
        return "a truthy constant" if test.value else None
    if isinstance(test, ast.JoinedStr):
        return "an f-string"
    if isinstance(test, (ast.Tuple, ast.List, ast.Set)) and test.elts or isinstance(test, ast.Dict) and test.keys:
        return "a non-empty literal"
    if isinstance(test, ast.Call):
        f = test.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name in _ALWAYS_TRUTHY_CALLS or name.endswith("sha256"):
            return f"the result of {name}() (a digest or rendering is never empty)"
    if isinstance(test, ast.Name) and test.id in module_names:
        return "a module object"
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], (ast.Eq, ast.Is)) \
            and ast.dump(test.left) == ast.dump(test.comparators[0]):
        return "x == x"
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or) \
            and any(isinstance(v, ast.Constant) and v.value for v in test.values):
        return "'or' with a truthy constant"
    return None


def cannot_fail_asserts(src: str, name: str = "<src>") -> list[str]:
    """``file:line: why`` for every assert in ``src`` whose condition is always true."""
    tree = ast.parse(src)
    modules: set[str] = set()
    for n in ast.walk(tree):  # names bound to modules: `x = require_module(...)`, `x = pytest.importorskip(...)`
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call):
            f = n.value.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if fname in ("require_module", "importorskip", "import_module"):
                modules |= {t.id for t in n.targets if isinstance(t, ast.Name)}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Assert):
            why = _why_cannot_fail(n.test, modules)
            if why:
                out.append(f"{name}:{n.lineno}: assert on {why}")
    return out


def test_the_checker_catches_what_it_should() -> None:
    bad = ('import hashlib\nt = require_module("x")\nassert hashlib.sha256(b"").hexdigest()\n'
           'assert "x"\nassert (a, "msg")\nassert t\nassert f"{a}"\nassert a == a\nassert a or True\n')
    assert len(cannot_fail_asserts(bad)) == 7
    good = 'assert digest == before\nassert rp\nassert re.fullmatch("x", s)\nassert not out.exists()\n'
    assert cannot_fail_asserts(good) == []


def test_no_assert_in_the_suite_cannot_fail() -> None:
    found = [hit for p in sorted(TESTS.rglob("*.py")) for hit in cannot_fail_asserts(p.read_text(), str(p))]
    assert found == []


def test_no_skip_waits_for_a_feature_to_land() -> None:
    stale = [f"{p}:{i}" for p in sorted(TESTS.rglob("*.py")) if p.name != Path(__file__).name
             for i, line in enumerate(p.read_text().splitlines(), 1) if "has not landed" in line]
    assert stale == []
