"""`templatetool build RECIPE.toml`: protect → vsc export → pdk new → shield, plus report.json.

The recipe schema is documented in docs/recipe.md. Relative paths are relative to the recipe's
folder. A section that is absent is skipped (so any subset runs). Secrets never appear in the
recipe: passwords and PINs are named by environment variable.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import time
import tomllib
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import write_bytes_atomic
from ..errors import FormatError, NotFoundError, UsageError

SECTIONS = {"template", "pdk", "shield", "report"}
MAX_RECIPE = 1 << 20
KEYS = {
    "template": {
        "golden",
        "output",
        "name",
        "version",
        "signer",
        "signer_password_env",
        "signer_pin_env",
        "vsc",
        "pss",
    },
    "pdk": {
        "output",
        "owner",
        "owner_password_env",
        "guardians",
        "version_rule",
        "policy",
        "answer_file",
        "other_files",
        "spec_values",
        "vsc",
        "allow_untrusted_root",
    },
    "shield": {
        "template",
        "pdk",
        "output",
        "kp",
        "owner",
        "owner_password_env",
        "guardians",
        "pcrs",
        "pcr_values",
        "tcg_log",
        "bank",
        "method",
        "tpm_parent",
        "verify_content",
    },
    "report": {"output"},
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Recipe:
    """A parsed, validated recipe."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            if self.path.stat().st_size > MAX_RECIPE:
                raise FormatError(
                    f"recipe too large ({self.path.stat().st_size} bytes, limit {MAX_RECIPE})", str(self.path)
                )
            self.data = tomllib.loads(self.path.read_text())
        except FileNotFoundError:
            raise NotFoundError("recipe not found", str(self.path)) from None
        except IsADirectoryError:
            raise UsageError("expected a recipe file, got a folder", str(self.path)) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"recipe is not valid TOML: {e}", str(self.path)) from None
        self.base = self.path.parent
        unknown = set(self.data) - SECTIONS
        if unknown:
            raise FormatError(
                f"unknown recipe section(s): {', '.join(sorted(unknown))}",
                str(self.path),
                f"sections: {', '.join(sorted(SECTIONS))}",
            )
        for sec, body in self.data.items():
            if not isinstance(body, dict):
                raise FormatError(f"[{sec}] must be a table", str(self.path))
            bad = set(body) - KEYS[sec]
            if bad:
                raise FormatError(
                    f"unknown key(s) in [{sec}]: {', '.join(sorted(bad))}",
                    str(self.path),
                    f"allowed: {', '.join(sorted(KEYS[sec]))}",
                )
        if not (set(self.data) & {"template", "pdk", "shield"}):
            raise FormatError("the recipe has nothing to do", str(self.path), "add [template], [pdk] and/or [shield]")
        self._validate()

    def _bad(self, sec: str, key: str, what: str) -> FormatError:
        return FormatError(f"[{sec}] {key} must be {what}", str(self.path))

    def _validate(self) -> None:
        """Every static check before any step runs (fail fast, nothing written)."""
        from ..catalog.qualifier import normalize_rule
        from ..pdk.document import POLICIES

        str_keys = {
            "template": (
                "golden",
                "output",
                "name",
                "version",
                "signer",
                "signer_password_env",
                "signer_pin_env",
                "vsc",
            ),
            "pdk": ("output", "owner", "owner_password_env", "version_rule", "policy", "answer_file", "vsc"),
            "shield": (
                "template",
                "pdk",
                "output",
                "kp",
                "owner",
                "owner_password_env",
                "tcg_log",
                "bank",
                "method",
                "tpm_parent",
            ),
            "report": ("output",),
        }
        for sec, keys in str_keys.items():
            for k in keys:
                v = self.data.get(sec, {}).get(k)
                if v is not None and (not isinstance(v, str) or not v):
                    raise self._bad(sec, k, "a non-empty string")
        for sec, k in (("pdk", "guardians"), ("pdk", "other_files"), ("shield", "guardians")):
            v = self.data.get(sec, {}).get(k)
            if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) and x for x in v)):
                raise self._bad(sec, k, "a list of paths")
        sv = self.get("pdk", "spec_values")
        if sv is not None and (not isinstance(sv, dict) or not all(isinstance(x, str) for x in sv.values())):
            raise self._bad("pdk", "spec_values", 'a table of strings, e.g. { "@ComputerName@" = "vm01" }')
        if "pdk" in self.data:
            try:
                normalize_rule(str(self.get("pdk", "version_rule", "eq")))
            except UsageError as e:
                raise FormatError(e.what, str(self.path), e.hint) from None
            if self.get("pdk", "policy", "shielded") not in POLICIES:
                raise self._bad("pdk", "policy", " or ".join(POLICIES))
        if "shield" in self.data:
            pcrs = self.get("shield", "pcrs", [7, 11])
            if not isinstance(pcrs, list) or not pcrs or not all(isinstance(x, int) and 0 <= x < 24 for x in pcrs):
                raise self._bad("shield", "pcrs", "a list of PCR numbers 0-23, e.g. [7, 11]")
            pv = self.get("shield", "pcr_values")
            if pv is not None:
                try:
                    ok = isinstance(pv, dict) and all(
                        0 <= int(k) < 24 and len(bytes.fromhex(v)) in (20, 32, 48) for k, v in pv.items()
                    )
                except (ValueError, TypeError):
                    ok = False
                if not ok:
                    raise self._bad(
                        "shield", "pcr_values", 'a table of PCR number → hex digest, e.g. { "7" = "00..." }'
                    )
            if (pv is None) == (self.get("shield", "tcg_log") is None):
                raise FormatError("[shield] needs exactly one of 'tcg_log' and 'pcr_values'", str(self.path))
            if self.get("shield", "method", "xts-aes-128") not in ("xts-aes-128", "xts-aes-256"):
                raise self._bad("shield", "method", "xts-aes-128 or xts-aes-256")
        for sec, k in (("template", "golden"), ("shield", "tcg_log"), ("shield", "tpm_parent"), ("pdk", "answer_file")):
            p = self.p(sec, k) if sec in self.data else None
            if p is not None and not p.is_file():
                raise NotFoundError(f"[{sec}] {k} not found", str(p))
        for sec, k in (
            ("template", "output"),
            ("template", "vsc"),
            ("pdk", "output"),
            ("shield", "output"),
            ("shield", "kp"),
            ("report", "output"),
        ):
            p = self.p(sec, k) if sec in self.data else None
            if p is not None and not p.parent.is_dir():
                raise NotFoundError(f"[{sec}] {k}: the output folder does not exist", str(p.parent), "create it first")

    def io_paths(self) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
        """The files the recipe reads and the files it writes, as ``([label, path], [label, path])``
        (shield's KP and escrow derived as the step derives them), for the CLI's output policy."""
        ins: list[tuple[str, Path]] = [("the recipe", self.path)]
        outs: list[tuple[str, Path]] = []
        for sec, k in (
            ("template", "golden"),
            ("template", "signer"),
            ("pdk", "owner"),
            ("pdk", "answer_file"),
            ("shield", "template"),
            ("shield", "pdk"),
            ("shield", "owner"),
            ("shield", "tcg_log"),
            ("shield", "tpm_parent"),
        ):
            v = self.get(sec, k) if sec in self.data else None
            if isinstance(v, str) and not v.startswith(("pkcs11:", "pem:")):
                ins.append((f"[{sec}] {k}", self.req(sec, k)))
        for sec, k in (
            ("template", "output"),
            ("template", "vsc"),
            ("pdk", "output"),
            ("shield", "output"),
            ("shield", "kp"),
            ("report", "output"),
        ):
            q = self.p(sec, k) if sec in self.data else None
            if q is not None:
                outs.append((f"[{sec}] {k}", q))
        out = self.p("shield", "output") if "shield" in self.data else None
        if out is not None:
            if self.get("shield", "kp") is None:
                outs.append(("[shield] kp (OUTPUT.kp)", out.with_suffix(".kp")))
            outs.append(("[shield] recovery escrow (OUTPUT.recovery.p7m)", out.with_suffix(".recovery.p7m")))
            if self.get("shield", "tpm_parent") is None:
                outs.append(("[shield] vTPM state (OUTPUT.vtpm)", out.with_suffix(".vtpm")))
        return ins, outs

    def get(self, sec: str, key: str, default: Any = None, required: bool = False) -> Any:
        v = self.data.get(sec, {}).get(key, default)
        if required and v in (None, ""):
            raise FormatError(f"[{sec}] needs {key!r}", str(self.path))
        return v

    def p(self, sec: str, key: str, default: str | None = None, required: bool = False) -> Path | None:
        v = self.get(sec, key, default, required)
        if v is None:
            return None
        if not isinstance(v, str):
            raise FormatError(f"[{sec}] {key} must be a path string", str(self.path))
        q = Path(v)
        return q if q.is_absolute() else self.base / q

    def req(self, sec: str, key: str) -> Path:
        """The path ``[sec] key`` (relative to the recipe); FormatError when it is missing."""
        q = self.p(sec, key, required=True)
        assert q is not None  # required: get() raised on None
        return q


def run_build(recipe_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Run a recipe; returns (and writes, when [report] output is set) the report.

    All-or-nothing: when a step fails, the artifacts earlier steps of this run wrote are removed
    (a failing step itself never leaves a partial output: every write is atomic).
    """
    r = Recipe(recipe_path)
    written: list[Path] = []
    try:
        return _run(r, written)
    except BaseException:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink()
        raise


def _run(r: Recipe, written: list[Path]) -> dict[str, Any]:
    from ..catalog.qualifier import VolumeIdQualifier
    from ..catalog.vsc import open_vsc, read_vsc_bytes
    from ..guardian.model import load_guardian
    from ..pdk.document import NamedFile, SecretPart
    from ..pdk.shielding import create_pdk
    from ..secrets import env_or_prompt
    from ..signers import load_signer
    from ..signers.pkcs11_signer import DEFAULT_PIN_ENV, MODULE_ENV
    from .protect import protect
    from .shield import shield

    t0 = time.monotonic()
    report: dict[str, Any] = {
        "tool": f"templatetool {__version__}",
        "recipe": str(r.path),
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "steps": {},
        "artifacts": {},
    }
    template_out: Path | None = None
    vsc_out: Path | None = None
    pdk_out: Path | None = None
    if "template" in r.data:
        t = time.monotonic()
        golden = r.req("template", "golden")
        template_out = r.req("template", "output")
        signer_spec = str(r.get("template", "signer", required=True))
        signer = load_signer(
            signer_spec,
            password=env_or_prompt(
                r.get("template", "signer_password_env"), f"password for {os.path.basename(signer_spec)}: "
            ),
            pin=env_or_prompt(r.get("template", "signer_pin_env") or DEFAULT_PIN_ENV, "token PIN: "),
            pkcs11_module=os.environ.get(MODULE_ENV) or None,
        )
        pr = protect(
            golden,
            template_out,
            str(r.get("template", "name", required=True)),
            str(r.get("template", "version", required=True)),
            signer,
            pss=bool(r.get("template", "pss", False)),
            overwrite=True,
        )
        written.append(template_out)
        vsc_out = r.p("template", "vsc") or template_out.with_suffix(".vsc")
        write_bytes_atomic(vsc_out, read_vsc_bytes(template_out))
        written.append(vsc_out)
        # the catalog written by this step is vsc_out (protect's own "vsc" is only a raw disk's sidecar)
        report["steps"]["protect"] = {**pr.to_json(), "vsc": str(vsc_out), "seconds": round(time.monotonic() - t, 3)}
        report["catalog_root"] = pr.document.root.hex()
        report["artifacts"]["template"] = str(template_out)
        report["artifacts"]["vsc"] = str(vsc_out)
    if "pdk" in r.data:
        t = time.monotonic()
        pdk_out = r.req("pdk", "output")
        vsc_path = r.p("pdk", "vsc") or vsc_out
        if vsc_path is None:
            raise FormatError("[pdk] needs 'vsc' (or a [template] section)", str(r.path))
        owner = load_guardian(r.req("pdk", "owner"), private=True, password_env=r.get("pdk", "owner_password_env"))
        guardians = [
            load_guardian(
                r.base / g if not Path(g).is_absolute() else g,
                allow_untrusted_root=bool(r.get("pdk", "allow_untrusted_root", False)),
            )
            for g in r.get("pdk", "guardians", [])
        ]
        if not guardians:
            raise FormatError("[pdk] needs at least one guardian", str(r.path))
        vi = open_vsc(read_vsc_bytes(vsc_path))
        q = VolumeIdQualifier.from_vsc(vi, str(r.get("pdk", "version_rule", "eq")))
        af = r.p("pdk", "answer_file")
        try:
            secret = SecretPart(
                answer_file=NamedFile(af.name, af.read_bytes()) if af else None,
                other_files=[
                    NamedFile(Path(f).name, (r.base / f).read_bytes()) for f in r.get("pdk", "other_files", [])
                ],
                specialization_values={str(k): str(v) for k, v in r.get("pdk", "spec_values", {}).items()},
            )
        except FileNotFoundError as e:
            raise NotFoundError("file named in [pdk] not found", str(e.filename)) from None
        der, warnings = create_pdk(
            owner,
            guardians,
            [q],
            secret,
            str(r.get("pdk", "policy", "shielded")),
            allow_untrusted_root=bool(r.get("pdk", "allow_untrusted_root", False)),
        )
        write_bytes_atomic(pdk_out, der)
        written.append(pdk_out)
        report["steps"]["pdk"] = {
            "output": str(pdk_out),
            "qualifier": q.to_json(),
            "warnings": warnings,
            "seconds": round(time.monotonic() - t, 3),
        }
        report["artifacts"]["pdk"] = str(pdk_out)
    if "shield" in r.data:
        t = time.monotonic()
        tmpl = r.p("shield", "template") or template_out
        pdk = r.p("shield", "pdk") or pdk_out
        if tmpl is None or pdk is None:
            raise FormatError("[shield] needs 'template' and 'pdk' (or [template]/[pdk] sections)", str(r.path))
        owner_dir = r.p("shield", "owner") or r.p("pdk", "owner")
        if owner_dir is None:
            raise FormatError("[shield] needs 'owner'", str(r.path))
        owner = load_guardian(
            owner_dir,
            private=True,
            password_env=r.get("shield", "owner_password_env", r.get("pdk", "owner_password_env")),
        )
        gpaths = r.get("shield", "guardians", r.get("pdk", "guardians", []))
        known = [
            load_guardian(r.base / g if not Path(g).is_absolute() else g, allow_untrusted_root=True) for g in gpaths
        ]
        pv = r.get("shield", "pcr_values")
        pcr_values = {int(k): bytes.fromhex(v) for k, v in pv.items()} if isinstance(pv, dict) else None
        tcg = r.p("shield", "tcg_log")
        if pcr_values is None and tcg is None:
            raise FormatError("[shield] needs 'tcg_log' or 'pcr_values'", str(r.path))
        out = r.req("shield", "output")
        kp_out = r.p("shield", "kp") or out.with_suffix(".kp")
        rep = shield(
            tmpl,
            pdk,
            out,
            owner,
            kp_path=kp_out,
            tpm_parent=r.p("shield", "tpm_parent"),
            pcrs=[int(x) for x in r.get("shield", "pcrs", [7, 11])],
            pcr_values=pcr_values,
            tcg_log=str(tcg) if tcg else None,
            bank=str(r.get("shield", "bank", "sha256")),
            method=str(r.get("shield", "method", "xts-aes-128")),
            verify_content=bool(r.get("shield", "verify_content", True)),
            guardians=known,
        )
        written.extend([out, kp_out, out.with_suffix(".recovery.p7m")])
        report["steps"]["shield"] = {**rep, "seconds": round(time.monotonic() - t, 3)}
        report["protector_ids"] = [p["guid"] for p in rep["bitlocker"]["protectors"]]
        report["artifacts"].update(
            {
                "vm_disk": rep["outputs"]["disk"],
                "kp": rep["outputs"]["kp"],
                "recovery_escrow": rep["outputs"]["recovery_escrow"],
            }
        )
    report["hashes"] = {k: _sha256(Path(v)) for k, v in report["artifacts"].items()}
    report["seconds"] = round(time.monotonic() - t0, 3)
    report_out = r.p("report", "output")
    if report_out is not None:
        import json

        write_bytes_atomic(report_out, json.dumps(report, indent=2, default=str).encode())
        report["report"] = str(report_out)
    return report


__all__ = ["Recipe", "run_build"]
