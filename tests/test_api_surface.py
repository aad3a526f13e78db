"""The public surface (docs/api.md): the CLI imports only public names, library hints name no CLI
flags, every error carries a stable code, and the package root re-exports the API."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "templatetool"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(importer: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def cli_import_violations(cli_dir: Path = PKG / "cli") -> list[str]:
    """Every ``from templatetool.X import Y`` in ``cli_dir`` whose Y is not public in X."""
    bad: list[str] = []
    for f in sorted(cli_dir.glob("*.py")):
        importer = _module_of(f)
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.ImportFrom):
                continue
            mod = _resolve(importer, node, f.name == "__init__.py")
            if not mod.startswith("templatetool") or mod.startswith("templatetool.cli"):
                continue
            where = f"{f.name}:{node.lineno}: from {mod} import"
            if any(part.startswith("_") for part in mod.split(".")):
                bad.append(f"{where} (private module)")
                continue
            target = importlib.import_module(mod)
            public = getattr(target, "__all__", None)
            for alias in node.names:
                y = alias.name
                if y.startswith("_") and not (y.startswith("__") and y.endswith("__")):
                    bad.append(f"{where} {y} (private name)")
                elif mod in ("templatetool.api", "templatetool.errors"):
                    continue
                elif importlib.util.find_spec(f"{mod}.{y}") is not None if hasattr(target, "__path__") else False:
                    continue  # a public submodule
                elif public is None or y not in public:
                    bad.append(f"{where} {y} (not in {mod}.__all__)")
    return bad


def test_cli_imports_only_public_names() -> None:
    assert cli_import_violations() == []


def test_the_import_check_catches_private_imports(tmp_path: Path) -> None:
    """The checker itself finds what it must (a check that cannot fail is no check)."""
    d = PKG / "cli"
    probe = d / "_probe_private_import.py"
    probe.write_text("from ..pipeline.encrypt import _pick\nfrom ..disk.partitions import Partition\n"
                     "from ..errors import UsageError\nfrom .. import api\n")
    try:
        bad = cli_import_violations(d)
    finally:
        probe.unlink()
    mine = [b for b in bad if b.startswith("_probe_private_import.py")]
    assert any("_pick (private name)" in b for b in mine), mine
    assert any("Partition (not in templatetool.disk.partitions.__all__)" in b for b in mine), mine
    assert len(mine) == 2, mine


def _hint_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants given as an error's hint: the 3rd positional argument or ``hint=`` of a
    call to a ``...Error`` class, and values assigned to a variable named ``hint``."""
    out: list[tuple[int, str]] = []

    def strings(n: ast.AST) -> list[str]:
        return [c.value for c in ast.walk(n) if isinstance(c, ast.Constant) and isinstance(c.value, str)]

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if not name.endswith("Error"):
                continue
            args = [node.args[2]] if len(node.args) >= 3 else []
            args += [k.value for k in node.keywords if k.arg == "hint"]
            for a in args:
                out += [(node.lineno, s) for s in strings(a)]
        elif isinstance(node, ast.Assign):
            names = [t for tgt in node.targets for t in ast.walk(tgt) if isinstance(t, ast.Name)]
            if any(n.id == "hint" for n in names):
                out += [(node.lineno, s) for s in strings(node.value)]
    return out


def library_flag_hints(root: Path = PKG) -> list[str]:
    """Library (outside cli/) error hints that name a command-line flag."""
    bad = []
    for f in sorted(root.rglob("*.py")):
        if "cli" in f.relative_to(root).parts:
            continue
        for line, s in _hint_strings(ast.parse(f.read_text(), str(f))):
            if FLAG.search(s):
                bad.append(f"{f.relative_to(root)}:{line}: {s!r}")
    return bad


def test_library_hints_name_no_cli_flags() -> None:
    """Library hints say what to do in library terms; the CLI maps error codes to its flags."""
    assert library_flag_hints() == []


def test_the_hint_check_catches_a_flag(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text('raise PolicyError("expired", "x", "pass --allow-expired")\n'
                                   'raise UsageError("what", hint=f"use --pcrs {1}")\n'
                                   'hint = "renew it, or pass --allow-expired"\n'
                                   'raise UsageError("a --flag in what is not a hint", "where", "no flag here")\n')
    bad = library_flag_hints(tmp_path)
    assert sorted(b.split(":")[1] for b in bad) == ["1", "2", "3"], bad


def test_cli_hints_map_library_codes() -> None:
    """Each CLI flag wording belongs to a code the library really raises."""
    from templatetool.cli.common import CLI_HINTS

    codes = set()
    for f in PKG.rglob("*.py"):
        if "cli" not in f.relative_to(PKG).parts:
            codes |= set(re.findall(r'code\s*=\s*"([a-z0-9.-]+)"', f.read_text()))
    assert set(CLI_HINTS) - codes == set()


def test_errors_carry_stable_codes() -> None:
    from templatetool import errors

    assert errors.UsageError("x").code == "usage"
    assert errors.IntegrityError("x").code == "integrity"
    assert errors.NotFoundError("x").code == "not-found"
    e = errors.PolicyError("certificate expired", "cert.pem", "renew it", code="cert.expired")
    assert (e.code, e.what, e.where, e.hint) == ("cert.expired", "certificate expired", "cert.pem", "renew it")
    assert e.to_json()["code"] == "cert.expired"
    assert errors.UsageError.code == "usage"  # the class keeps its own code


def test_cli_prints_the_flag_wording_of_a_coded_error(tmp_path: Path) -> None:
    """The library says "allow overwriting it"; the CLI line names --overwrite (same as before)."""
    from templatetool.cli.common import cli_hint
    from templatetool.errors import UsageError

    e = UsageError("output exists", "x.vhdx", "choose another name, or allow overwriting it", code="output.exists")
    assert "--overwrite" not in str(e)
    assert cli_hint(e) == "choose another name, or pass --overwrite to replace it"
    assert cli_hint(UsageError("x", hint="plain")) == "plain"


def test_package_root_reexports_the_api() -> None:
    import templatetool
    from templatetool import api, errors, signers

    for name in templatetool.__all__:
        assert getattr(templatetool, name) is not None, name
    for name in api.__all__:
        if name not in ("JSONValue",):
            assert name in templatetool.__all__, name
    assert templatetool.protect is api.protect
    assert templatetool.UsageError is errors.UsageError
    assert templatetool.Signer is signers.Signer
    assert templatetool.SecretSource is signers.SecretSource
    with pytest.raises(AttributeError):
        templatetool.no_such_name  # noqa: B018


def test_every_package_declares_all() -> None:
    for init in sorted(PKG.glob("*/__init__.py")):
        if init.parent.name == "cli":
            continue
        mod = importlib.import_module(_module_of(init))
        assert isinstance(getattr(mod, "__all__", None), list), f"{mod.__name__} has no __all__"
        for name in mod.__all__:
            assert getattr(mod, name, None) is not None, f"{mod.__name__}.__all__ names a missing {name}"


#: Library modules allowed to read a secret from the environment or a prompt: the helpers
#: themselves, build recipes (a front end) and load_guardian's legacy ``password_env`` shim.
SECRET_READERS = {"secrets.py", "pipeline/build.py", "guardian/model.py"}


def test_only_front_ends_prompt_or_read_secret_variables() -> None:
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).as_posix()
        if rel.startswith("cli/") or rel in SECRET_READERS:
            continue
        text = f.read_text()
        for word in ("getpass", "read_secret", "env_or_prompt"):
            if re.search(rf"\b{word}\b", text):
                bad.append(f"{rel}: {word}")
    assert bad == []
