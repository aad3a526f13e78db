"""Secret hygiene: no secret in logs, stdout/stderr, exception texts, temp files or argv.

The whole pipeline runs (``run_demo`` in-process, then the CLI steps that take passwords through
environment variables in forked CLI children) with the root logger at DEBUG writing to a file,
stdout/stderr captured, every spawned process's argv recorded, and TMPDIR pointing at a private
folder. Afterwards every secret is recovered through our library (the recovery password from the
owner's escrow, the VMK and FVEK by unlocking, the vTPM state key K from the key protector,
the startup key from the .BEK) and searched for — raw, hex, base64 at every alignment, UTF-16 —
in all of those and in every file written, except the intended secret outputs (.BEK, recovery
password files, PFX and private-key files, which must be mode 0600).

Also: AES-CCM nonces, VMKs and FVEKs never repeat across repeated small encryptions.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from templatetool.errors import TemplateToolError

from . import corpus_gen as cg
from .conftest import GOLDEN, require_tool

PASSWORD = "Hygiene-Volume-Pass-31337"
PFX_PASS = "Hygiene-Pfx-Pass-4242"
GUARDIAN_PASS = "Hygiene-Guardian-Pass-777"
PIN = "918273645"

#: Files that are meant to hold a secret (checked for mode 0600 instead of scanned).
SECRET_SUFFIXES = (".bek", ".BEK", ".pfx", "key.pem", "_key.pem", ".key", "rp.txt", ".recovery.p7m", "unsealed.bin")


def encodings(secret: bytes | str) -> list[bytes]:
    """Byte patterns that reveal ``secret``: raw, hex (both cases), base64 at every alignment, UTF-16."""
    out: list[bytes] = []
    if isinstance(secret, str):
        out += [secret.encode(), secret.encode("utf-16-le")]
        raw = secret.encode()
        if "-" in secret and secret.replace("-", "").isdigit():
            out.append(secret.replace("-", "").encode())
    else:
        raw = secret
        out.append(raw)
    out += [raw.hex().encode(), raw.hex().upper().encode()]
    for shift in range(3):
        chunk = raw[shift:]
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            b = enc(chunk).rstrip(b"=")
            # drop the trailing char(s) that depend on what follows
            core = b[: (len(chunk) // 3) * 4]
            if len(core) >= 16:
                out.append(core)
    return [p for p in out if len(p) >= 8]


def scan(blob: bytes, secrets: dict[str, bytes | str]) -> list[str]:
    hits = []
    for name, s in secrets.items():
        for p in encodings(s):
            if p in blob:
                hits.append(name)
                break
    return hits


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the pipeline with everything captured; return what was captured and the secrets."""
    require_tool("mkntfs", "ntfscp", "qemu-img")
    cg.preload_cli()
    base = tmp_path_factory.mktemp("hygiene")
    work, tmp = base / "work", base / "tmp"
    work.mkdir()
    tmp.mkdir()
    logfile = base / "debug.log"
    argv_log = base / "argv.log"
    captured: list[str] = []
    exc_texts: list[str] = []

    root = logging.getLogger()
    old_level = root.level
    handler = logging.FileHandler(logfile)
    handler.setLevel(logging.DEBUG)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    real_popen_init = subprocess.Popen.__init__

    def popen_init(self, args, *a, **kw):  # record every spawned process's argv (also in forked children)
        with open(argv_log, "a") as f:
            f.write(repr(args) + "\n")
        return real_popen_init(self, args, *a, **kw)

    old_tmp = tempfile.tempdir
    old_env_tmp = os.environ.get("TMPDIR")
    subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]
    tempfile.tempdir = str(tmp)
    os.environ["TMPDIR"] = str(tmp)
    out, err = io.StringIO(), io.StringIO()
    try:
        from templatetool.pipeline.demo import run_demo

        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run_demo(GOLDEN, work / "demo", say=lambda s: captured.append(s))
        env = {"HY_PW": PASSWORD, "HY_PFX": PFX_PASS, "HY_GPW": GUARDIAN_PASS, "HY_PIN": PIN}
        steps = [
            ["encrypt", str(work / "demo" / "template.vhdx"), "-o", str(work / "enc.vhdx"), "--password-env", "HY_PW",
             "--recovery-password-out", str(work / "rp.txt"), "--startup-key-out", str(work / "startup.bek"),
             "--json"],
            ["cert", "new", "--signing", "--subject", "CN=Hygiene", "--key", "ec-p256", "-o", str(work / "signer.pfx"),
             "--password-env", "HY_PFX", "--json"],
            ["guardian", "new", "Locked", "--key", "ec-p256", "-o", str(work / "locked"), "--password-env", "HY_GPW",
             "--json"],
            ["vtpm", "new", "-o", str(work / "vtpm"), "--json"],
            ["escrow", "open", str(work / "demo" / "vm.recovery.p7m"), "--owner", str(work / "demo" / "owner"),
             "-o", str(work / "demo-rp.txt"), "--json"],
        ]
        (work / "seal-secret.bin").write_bytes(os.urandom(32))
        steps.append(["tpm", "seal", "--parent", str(work / "vtpm.pub"), "--pcr-values", f"7={'11' * 32}",
                      "--pin-env", "HY_PIN", "--secret-file", str(work / "seal-secret.bin"), "-o",
                      str(work / "sealed.bin"), "--json"])
        steps.append(["tpm", "unseal", str(work / "sealed.bin"), "--key", str(work / "vtpm.key"), "--pcr-values",
                      f"7={'11' * 32}", "--pin-env", "HY_PIN", "-o", str(work / "unsealed.bin")])
        # failures that involve the secrets: their messages must not echo them
        failing = [
            ["decrypt", str(work / "enc.vhdx"), "-o", str(work / "x.vhdx"), "--password-env", "HY_BAD"],
            ["decrypt", str(work / "enc.vhdx"), "-o", str(work / "x.vhdx"), "--recovery-password-env", "HY_BADRP"],
            ["tpm", "unseal", str(work / "sealed.bin"), "--key", str(work / "vtpm.key"), "--pcr-values",
             f"7={'11' * 32}", "--pin-env", "HY_BADPIN", "-o", str(work / "x.bin")],
            ["pdk", "show", str(work / "demo" / "tenant.pdk"), "--key", str(work / "locked"), "--password-env",
             "HY_BADG"],
        ]
        results = []
        for argv in steps:
            cp = cg.fork_cli(*argv, env=env)
            assert cp.returncode == 0, (argv, cp.stderr)
            results.append((argv, cp))
        bad_env = {**env, "HY_BAD": PASSWORD + "x", "HY_BADPIN": PIN[:-1],
                   "HY_BADG": GUARDIAN_PASS[:-1] + "?"}
        for argv in failing:
            rp_now = (work / "rp.txt").read_text().strip()
            bad_env["HY_BADRP"] = rp_now[:-6] + ("000011" if rp_now[-6:] != "000011" else "000022")
            cp = cg.fork_cli(*argv, env=bad_env)
            assert cp.returncode in (3, 4, 5), (argv, cp.returncode, cp.stderr)
            results.append((argv, cp))
    finally:
        subprocess.Popen.__init__ = real_popen_init  # type: ignore[method-assign]
        tempfile.tempdir = old_tmp
        if old_env_tmp is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env_tmp
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)

    secrets = recover_secrets(work, exc_texts)
    return {"work": work, "tmp": tmp, "logfile": logfile, "argv_log": argv_log, "captured": captured,
            "stdout": out.getvalue(), "stderr": err.getvalue(), "results": results, "secrets": secrets,
            "exc_texts": exc_texts}


def _volume(path: Path):
    from templatetool.bitlocker.volume import open_fve
    from templatetool.disk import open_disk, select_volume

    dev = open_disk(path)
    view, _ = select_volume(dev, 3)
    return open_fve(view)


def recover_secrets(work: Path, exc_texts: list[str]) -> dict[str, bytes | str]:
    """Every secret generated in the run, recovered through the library."""
    import json

    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from templatetool.bitlocker.keys import parse_bek
    from templatetool.cms.enveloped import open_envelope
    from templatetool.guardian.model import load_guardian
    from templatetool.kp.protector import unwrap
    from templatetool.pipeline.shield import VmSecret

    s: dict[str, bytes | str] = {"volume password": PASSWORD, "PFX password": PFX_PASS,
                                 "guardian PFX password": GUARDIAN_PASS, "PIN": PIN}
    demo = work / "demo"
    owner = load_guardian(demo / "owner", private=True)
    esc = json.loads(open_envelope((demo / "vm.recovery.p7m").read_bytes(), owner.encryption_key,
                                   owner.encryption_certificate))
    s["demo recovery password"] = esc["recovery_password"]
    fve = _volume(demo / "vm.vhdx")
    vmk = fve.recover_vmk(recovery_password=esc["recovery_password"])
    s["demo VMK"], s["demo FVEK"] = vmk, fve.fvek(vmk)
    fabric = load_guardian(demo / "fabric", private=True)
    kp_secret = unwrap((demo / "vm.kp").read_bytes(), fabric)
    s["KP secret (VM secret JSON)"] = kp_secret
    vs = VmSecret.from_bytes(kp_secret)
    key = vs.private_key()  # a software vTPM key (--vtpm software); the demo's vTPM is a swtpm state
    if vs.vtpm_key_der is not None:
        s["vTPM private key DER"] = vs.vtpm_key_der
    if vs.vtpm_state_key is not None:
        s["vTPM state key K"] = vs.vtpm_state_key
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        s["vTPM RSA p"] = n.p.to_bytes((n.p.bit_length() + 7) // 8, "big")
        s["vTPM RSA d"] = n.d.to_bytes((n.d.bit_length() + 7) // 8, "big")
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        s["vTPM EC d"] = key.private_numbers().private_value.to_bytes(32, "big")
    rp = (work / "rp.txt").read_text().strip()
    s["encrypt recovery password"] = rp
    fve2 = _volume(work / "enc.vhdx")
    vmk2 = fve2.recover_vmk(password=PASSWORD)
    s["encrypt VMK"], s["encrypt FVEK"] = vmk2, fve2.fvek(vmk2)
    assert fve2.recover_vmk(recovery_password=rp) == vmk2
    s["startup key"] = parse_bek((work / "startup.bek").read_bytes()).key
    s["sealed secret"] = (work / "seal-secret.bin").read_bytes()
    assert (work / "unsealed.bin").read_bytes() == s["sealed secret"]
    # exception texts from library calls with wrong credentials
    for kw in ({"password": PASSWORD + "!"}, {"recovery_password": rp[:-1] + "0"}, {"vmk": bytes(32)}):
        try:
            fve2.unlock(**kw)
        except TemplateToolError as e:
            exc_texts += [str(e), repr(e), repr(e.__dict__)]
    return s


def test_secrets_recovered(run: dict) -> None:
    s = run["secrets"]
    assert len(s["demo VMK"]) == 32 and len(s["encrypt FVEK"]) in (16, 32, 64)
    assert s["demo FVEK"] != s["encrypt FVEK"] and s["demo VMK"] != s["encrypt VMK"]
    assert len(s["vTPM state key K"]) == 32  # the demo VM's swtpm vTPM
    assert len(s) >= 14


def test_no_secret_in_logs_output_exceptions_argv(run: dict) -> None:
    s = run["secrets"]
    texts = {
        "debug log": run["logfile"].read_bytes(),
        "demo say()": "\n".join(run["captured"]).encode(),
        "stdout": run["stdout"].encode(),
        "stderr": run["stderr"].encode(),
        "exception texts": "\n".join(run["exc_texts"]).encode(),
        "argv of spawned processes": run["argv_log"].read_bytes() if run["argv_log"].exists() else b"",
    }
    for argv, cp in run["results"]:
        texts[f"argv {argv[:2]}"] = repr(argv).encode()
        texts[f"stdout {argv[:2]}"] = cp.stdout.encode()
        texts[f"stderr {argv[:2]}"] = cp.stderr.encode()
    assert len(run["exc_texts"]) >= 6
    hits = {k: scan(v, s) for k, v in texts.items()}
    hits = {k: v for k, v in hits.items() if v}
    assert not hits, hits


def _intended_secret(p: Path) -> bool:
    return p.name.endswith(SECRET_SUFFIXES)


def test_no_secret_in_files_and_temp_dirs(run: dict) -> None:
    s = run["secrets"]
    scanned, hits = 0, {}
    for folder in (run["work"], run["tmp"]):
        for p in folder.rglob("*"):
            if not p.is_file() or _intended_secret(p) or p.name == "seal-secret.bin":
                continue
            found = scan(p.read_bytes(), s)
            scanned += 1
            if found:
                hits[str(p.relative_to(folder.parent))] = found
    print(f"\nsecret scan: {len(s)} secrets over {scanned} files")
    assert scanned >= 20
    assert not hits, hits
    leftovers = [str(p) for p in run["tmp"].rglob("*")]
    assert not leftovers, f"files left in TMPDIR: {leftovers}"


def test_secret_files_are_0600(run: dict) -> None:
    w = run["work"]
    files = [w / "rp.txt", w / "startup.bek", w / "demo-rp.txt", w / "signer.pfx", w / "vtpm.key", w / "unsealed.bin",
             w / "demo" / "vm.recovery.p7m", w / "demo" / "signer.key.pem"]
    files += list((w / "demo").rglob("*.pfx")) + list((w / "demo").rglob("*key*.pem")) + list((w / "locked").glob("*.pfx"))
    assert len(files) >= 14
    bad = {str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in files if stat.S_IMODE(f.stat().st_mode) != 0o600}
    assert not bad, bad


# ---- nonces and keys never repeat -----------------------------------------------------------

def _ccm_nonces(meta) -> list[bytes]:
    from templatetool.bitlocker import structs as S

    out = []

    def walk(entries):
        for e in entries:
            if e.vtype == S.VT_AES_CCM:
                out.append(bytes(e.payload[:12]))
            walk(e.children())

    walk(meta.entries)
    if meta.validation_ccm is not None:
        out.append(bytes(meta.validation_ccm[:12]))
    return out


def _unique_runs(n: int, tmp_path: Path) -> None:
    from templatetool.bitlocker.volume import (
        FveRegions,
        ProtectorSpec,
        encrypt_volume,
        open_fve,
    )
    from templatetool.blockdev import RawFile

    size = 1 << 20
    src_path = tmp_path / "zero.img"
    with open(src_path, "wb") as f:
        f.truncate(size)
    regions = FveRegions((0x10000, 0x30000, 0x50000), 0x70000)
    src = RawFile(src_path)
    nonces: list[bytes] = []
    vmks, fveks, guids, exts = set(), set(), set(), set()
    try:
        for i in range(n):
            dst_path = tmp_path / "enc.img"
            dst = RawFile.create(dst_path, size)
            try:
                r = encrypt_volume(src, dst, protectors=[ProtectorSpec("startup_key"), ProtectorSpec("clear")],
                                   regions=regions)
            finally:
                dst.close()
            dev = RawFile(dst_path)
            try:
                fve = open_fve(dev)
                vmk = fve.recover_vmk(bek=r.bek)
                assert fve.recover_vmk(clear=True) == vmk
                fvek = fve.fvek(vmk)
                per_volume = _ccm_nonces(fve.metadata)
                assert len(per_volume) == len(set(per_volume)) >= 5, "nonce reused under one key"
                nonces += per_volume
                vmks.add(vmk)
                fveks.add(fvek)
                guids.add(fve.info()["volume_guid"])
                from templatetool.bitlocker.keys import parse_bek

                exts.add(parse_bek(r.bek).key)
            finally:
                dev.close()
            dst_path.unlink()
    finally:
        src.close()
    assert len(vmks) == len(fveks) == len(guids) == len(exts) == n
    assert len(set(nonces)) == len(nonces), "an AES-CCM nonce repeated across runs"
    assert not (vmks & fveks)


def test_nonces_and_keys_never_repeat(tmp_path: Path) -> None:
    _unique_runs(60, tmp_path)


@pytest.mark.slow
def test_nonces_and_keys_never_repeat_1000(tmp_path: Path) -> None:
    _unique_runs(1000, tmp_path)


def test_cli_rejects_secret_in_argv() -> None:
    """There is no option taking a password/PIN value itself: only *-env options or prompts."""
    import click

    import templatetool.cli.main as m

    cg.preload_cli()
    m._load()
    bad = []

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])
            return
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.is_flag:
                for o in p.opts:
                    low = o.lower()
                    if any(w in low for w in ("password", "pin", "passphrase", "secret", "key")) and \
                            not (low.endswith("-env") or low.endswith("-file") or low.endswith("-out")):
                        bad.append((" ".join(path), o, p.help))
    walk(m.cli, [])
    # options naming a key *file* or folder are fine; list them to show what was allowed
    allowed = {"--key", "--startup-key", "--host-key", "--secret-file"}
    bad = [b for b in bad if b[1] not in allowed]
    assert not bad, bad


def test_scanner_finds_planted_secrets() -> None:
    """The scan is not blind: each encoding of a key or password embedded in noise is found."""
    r = __import__("random").Random(5)
    key = r.randbytes(32)
    pw = "Planted-Password-123"
    for s in (key, pw):
        raw = s if isinstance(s, bytes) else s.encode()
        for blob in (raw, raw.hex().encode(), raw.hex().upper().encode(), s.encode("utf-16-le") if isinstance(s, str) else raw,
                     *[base64.b64encode(r.randbytes(k) + raw + r.randbytes(3)) for k in range(3)],
                     *[base64.urlsafe_b64encode(r.randbytes(k) + raw) for k in range(3)]):
            noisy = r.randbytes(100) + blob + r.randbytes(100)
            assert scan(noisy, {"x": s}) == ["x"], blob
    assert scan(r.randbytes(4096), {"x": key, "y": pw}) == []
