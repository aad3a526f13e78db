"""Deterministic bad-input corpus for every parser, generated from valid artifacts.

``make_artifacts(dir)`` builds one valid specimen of every input kind (the demo pipeline's
outputs plus a tiny BitLocker volume, a raw GPT disk, a small VHDX, a sealed vTPM blob,
guardian metadata XML, host evidence and a password-protected PFX). ``build_corpus(art)``
derives malformed variants from them by truncation, byte flips at structure offsets, field
overwrites (checksums recomputed so the bad field itself is reached), wrong types and huge
sizes. Each :class:`Case` names the CLI command that must refuse it with one clear line and a
documented exit code, and the outputs that must not exist afterwards.

Also used by ``tools/fuzz.py`` to seed the fuzzing corpora (``seed_inputs``).
"""

from __future__ import annotations

import binascii
import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "fixtures" / "golden.vhdx"

#: Documented failure exit codes (docs/exit-codes.md) a bad input may produce.
DOCUMENTED_FAILURES = {2, 3, 4, 5, 6, 7, 8, 9}

PFX_PASSWORD = "corpus-Pfx-pass-7"
GUARDIAN_PASSWORD = "corpus-Guardian-pass-9"


# ---------------------------------------------------------------------------------------------
# running the CLI: a forked child per case (same entry point and process semantics as
# ``python -m templatetool.cli.main``, without paying the interpreter start-up each time)
# ---------------------------------------------------------------------------------------------

def preload_cli() -> None:
    """Import the CLI and the libraries it uses once, so forked children start fast."""
    import importlib

    import templatetool.cli.main as m

    for name in m.COMMAND_MODULES:
        importlib.import_module(f"templatetool.cli.{name}")
    for mod in ("templatetool.vhdx", "templatetool.disk", "templatetool.bitlocker.volume", "templatetool.tpm.protector",
                "templatetool.tpm.eventlog", "templatetool.catalog.vsc", "templatetool.pdk.shielding",
                "templatetool.kp.protector", "templatetool.guardian.metadata", "templatetool.hgs",
                "templatetool.pipeline.encrypt", "templatetool.pipeline.build"):
        importlib.import_module(mod)


def fork_cli(*args: str, env: dict[str, str] | None = None, cwd: str | None = None,
             timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``templatetool ARGS`` in a forked child; return a CompletedProcess (text)."""
    import signal
    import time

    import templatetool.cli.main as m

    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 71
        try:
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdin = open(0, "r", closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.environ.pop("TEMPLATETOOL_DEBUG", None)
            if env:
                os.environ.update(env)
            if cwd:
                os.chdir(cwd)
            try:
                m.main(list(args))
                code = 0
            except SystemExit as e:
                c = e.code
                code = c if isinstance(c, int) else (0 if c is None else 1)
        except BaseException:  # noqa: BLE001 - report harness failure as 71
            import traceback

            traceback.print_exc()
            code = 71
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"templatetool {' '.join(args)} did not finish in {timeout} s")
        time.sleep(0.005)
    rc = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(["templatetool", *args], rc, out.read().decode(errors="replace"),
                                       err.read().decode(errors="replace"))


# ---------------------------------------------------------------------------------------------
# valid artifacts
# ---------------------------------------------------------------------------------------------

@dataclass
class Artifacts:
    dir: Path
    demo: Path
    files: dict[str, Path] = field(default_factory=dict)
    recovery_password: str = ""

    def __getitem__(self, k: str) -> Path:
        return self.files[k]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cp = fork_cli(*args, env=env)
    if cp.returncode != 0:
        raise RuntimeError(f"templatetool {' '.join(args)} failed ({cp.returncode}): {cp.stderr}")
    return cp


def make_bitlocker_volume(d: Path, size_mib: int = 8) -> tuple[Path, Path, str, Path]:
    """A bare NTFS volume encrypted by our library: (encrypted, .BEK, recovery password, plaintext)."""
    from templatetool.bitlocker.reserve import reserve_ntfs
    from templatetool.bitlocker.volume import ProtectorSpec, encrypt_volume
    from templatetool.blockdev import RawFile

    plain = d / "bl-plain.img"
    with open(plain, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkntfs", "-q", "-F", "-f", "-s", "512", "-c", "4096", "-L", "corpus", str(plain)], check=True,
                   capture_output=True)
    hello = d / "hello.txt"
    hello.write_bytes(b"hello corpus\n" * 1000)
    subprocess.run(["ntfscp", "-q", str(plain), str(hello), "hello.txt"], check=True, capture_output=True)
    hello.unlink()
    regions = reserve_ntfs(plain)
    enc = d / "bl.img"
    src = RawFile(plain)
    dst = RawFile.create(enc, src.size)
    try:
        r = encrypt_volume(src, dst, protectors=[ProtectorSpec("recovery_password"), ProtectorSpec("startup_key")],
                           regions=regions)
    finally:
        src.close()
        dst.close()
    bek = d / "bl.bek"
    bek.write_bytes(r.bek)
    return enc, bek, r.recovery_password, plain


def make_gpt_disk(path: Path) -> Path:
    """A 4 MiB raw disk with a GPT holding one partition (made by sgdisk)."""
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["sgdisk", "-n", "1:2048:+2M", "-t", "1:0700", "-c", "1:data", str(path)], check=True,
                   capture_output=True)
    return path


def make_artifacts(d: Path) -> Artifacts:
    """Build one valid specimen of every input kind in ``d`` (about 15 s)."""
    from cryptography.hazmat.primitives import hashes

    from templatetool.hgs import create_evidence, load_host
    from templatetool.pipeline.demo import run_demo
    from templatetool.vhdx.writer import create_vhdx

    preload_cli()
    d.mkdir(parents=True, exist_ok=True)
    demo = d / "demo"
    run_demo(GOLDEN, demo, say=lambda s: None)
    a = Artifacts(d, demo)
    f = a.files
    for name in ("template.vhdx", "template.vsc", "tenant.pdk", "vm.kp", "vm.vhdx", "vm-reference.tcglog",
                 "vm.recovery.p7m", "signer.pem", "signer.key.pem"):
        f[name] = demo / name
    enc, bek, rp, plain = make_bitlocker_volume(d)
    f["bl.img"], f["bl.bek"], f["bl-plain.img"] = enc, bek, plain
    a.recovery_password = rp
    f["gpt.img"] = make_gpt_disk(d / "gpt.img")
    small = d / "small.vhdx"
    disk = create_vhdx(small, 8 << 20, "dynamic", block_size=1 << 20)
    try:
        disk.write(0, hashlib.sha256(b"corpus").digest() * 2048)
        disk.write(5 << 20, b"\x5a" * 4096)
    finally:
        disk.close()
    f["small.vhdx"] = small
    _run("vtpm", "new", "-o", str(d / "vtpm"))
    f["vtpm.pub"], f["vtpm.key"], f["vtpm.pem"] = d / "vtpm.pub", d / "vtpm.key", d / "vtpm.pem"
    (d / "secret.bin").write_bytes(b"corpus-secret-0123456789abcdef!")
    _run("tpm", "seal", "--parent", str(d / "vtpm.pub"), "--pcr-values", f"7={'11' * 32},11={'22' * 32}",
         "--secret-file", str(d / "secret.bin"), "-o", str(d / "sealed.bin"))
    f["sealed.bin"] = d / "sealed.bin"
    _run("guardian", "export", str(demo / "fabric"), "-o", str(d / "fabric.xml"))
    f["fabric.xml"] = d / "fabric.xml"
    (d / "evidence.json").write_bytes(create_evidence(load_host(demo / "host")))
    f["evidence.json"] = d / "evidence.json"
    f["attestation.json"] = demo / "fabric" / "attestation.json"
    _run("cert", "new", "--signing", "--subject", "CN=Corpus Signer", "--key", "ec-p256", "-o",
         str(d / "corpus-signer.pfx"), "--password-env", "TT_CORPUS_PFX", env={"TT_CORPUS_PFX": PFX_PASSWORD})
    f["signer.pfx"] = d / "corpus-signer.pfx"
    _run("guardian", "new", "Locked", "--key", "ec-p256", "-o", str(d / "locked-guardian"), "--password-env",
         "TT_CORPUS_GPW", env={"TT_CORPUS_GPW": GUARDIAN_PASSWORD})
    f["locked-guardian"] = d / "locked-guardian"
    f["cert.der"] = d / "cert.der"
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(f["signer.pem"].read_bytes())
    f["cert.der"].write_bytes(cert.public_bytes(serialization.Encoding.DER))
    assert cert.fingerprint(hashes.SHA256()) == hashlib.sha256(f["cert.der"].read_bytes()).digest()
    return a


_SESSION: dict[str, Artifacts] = {}


def session_artifacts(tmp_path_factory) -> Artifacts:
    """The valid artifacts, built once per pytest session (shared by the reliability modules)."""
    if "a" not in _SESSION:
        from .conftest import require_tool

        require_tool("mkntfs", "ntfscp", "sgdisk", "qemu-img")
        _SESSION["a"] = make_artifacts(tmp_path_factory.mktemp("corpus-artifacts"))
    return _SESSION["a"]


# ---------------------------------------------------------------------------------------------
# mutation helpers
# ---------------------------------------------------------------------------------------------

def flip(data: bytes, off: int, mask: int = 0xFF) -> bytes:
    b = bytearray(data)
    b[off % len(b)] ^= mask
    return bytes(b)


def put(data: bytes, off: int, raw: bytes) -> bytes:
    b = bytearray(data)
    b[off:off + len(raw)] = raw
    return bytes(b)


def truncations(data: bytes, extra: tuple[int, ...] = ()) -> list[tuple[str, bytes]]:
    n = len(data)
    cuts = sorted({0, 1, 7, min(16, n - 1), n // 4, n // 2, n - 1, *[e for e in extra if 0 <= e < n]})
    return [(f"trunc{c}", data[:c]) for c in cuts]


def crc32c(data: bytes) -> int:
    import crc32c as c

    return c.crc32c(data)


@dataclass
class Case:
    """One malformed input and the command that must refuse it."""

    id: str
    kind: str
    files: dict[str, bytes]  # written into the case folder
    argv: list[str]  # {case} = case folder, {art} = artifacts folder, {demo} = demo folder
    env: dict[str, str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # must not exist afterwards (relative to {case})
    copy: dict[str, str] = field(default_factory=dict)  # {case}/name <- artifact path (copied before)
    codes: set[int] = field(default_factory=lambda: set(DOCUMENTED_FAILURES))

    def materialise(self, art: Artifacts, case_dir: Path) -> list[str]:
        case_dir.mkdir(parents=True, exist_ok=True)
        for name, src in self.copy.items():
            s = Path(src.format(art=art.dir, demo=art.demo))
            if s.is_dir():
                shutil.copytree(s, case_dir / name)
            else:
                shutil.copyfile(s, case_dir / name)
        for name, data in self.files.items():
            p = case_dir / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        return [x.format(case=case_dir, art=art.dir, demo=art.demo) for x in self.argv]


# ---------------------------------------------------------------------------------------------
# per-kind generators
# ---------------------------------------------------------------------------------------------

def _vhdx_fix_header(b: bytearray, off: int) -> None:
    b[off + 4:off + 8] = b"\0\0\0\0"
    struct.pack_into("<I", b, off + 4, crc32c(bytes(b[off:off + 4096])))


def _vhdx_fix_region(b: bytearray, off: int) -> None:
    b[off + 4:off + 8] = b"\0\0\0\0"
    struct.pack_into("<I", b, off + 4, crc32c(bytes(b[off:off + 65536])))


def _vhdx_regions(b: bytes) -> dict[str, tuple[int, int, int]]:
    """{'bat'|'meta': (entry offset in table 1, file offset, length)}"""
    out = {}
    base = 192 * 1024
    n = struct.unpack_from("<I", b, base + 8)[0]
    for i in range(n):
        e = base + 16 + 32 * i
        g = uuid.UUID(bytes_le=bytes(b[e:e + 16]))
        off, ln = struct.unpack_from("<QI", b, e + 16)
        key = {"2dc27766-f623-4200-9d64-115e9bfd4a08": "bat", "8b7ca206-4790-4b9a-b8fe-575f050f886e": "meta"}.get(str(g))
        if key:
            out[key] = (e - base, off, ln)
    return out


def _vhdx_meta_items(b: bytes, meta_off: int) -> dict[str, int]:
    """item name -> absolute file offset of its table entry."""
    names = {"caa16737-fa36-4d43-b3b6-33f0aa44e76b": "params", "2fa54224-cd1b-4876-b211-5dbed83bf4b8": "size",
             "8141bf1d-a96f-4709-ba47-f233a8faab5f": "lss", "cda348c7-445d-4471-9cc9-e9885251c556": "pss",
             "beca12ab-b2e6-4523-93ef-c309e000c746": "id"}
    n = struct.unpack_from("<H", b, meta_off + 10)[0]
    out = {}
    for i in range(n):
        e = meta_off + 32 + 32 * i
        g = str(uuid.UUID(bytes_le=bytes(b[e:e + 16])))
        out[names.get(g, g)] = e
    return out


def vhdx_cases(art: Artifacts) -> list[Case]:
    base = art["small.vhdx"].read_bytes()
    reg = _vhdx_regions(base)
    _, meta_off, _ = reg["meta"]
    _, bat_off, _ = reg["bat"]
    items = _vhdx_meta_items(base, meta_off)
    variants: list[tuple[str, bytes]] = []
    variants += [(n, d) for n, d in truncations(base, (64 * 1024 + 100, 192 * 1024 + 8, 1 << 20, meta_off + 40,
                                                         bat_off + 8))]
    variants.append(("file-id", put(base, 0, b"vhdxfilf")))
    variants.append(("file-id-zero", put(base, 0, bytes(8))))

    def both_headers(fn) -> bytes:
        b = bytearray(base)
        for h in (64 * 1024, 128 * 1024):
            fn(b, h)
            _vhdx_fix_header(b, h)
        return bytes(b)

    def both_regions(fn) -> bytes:
        b = bytearray(base)
        for r in (192 * 1024, 256 * 1024):
            fn(b, r)
            _vhdx_fix_region(b, r)
        return bytes(b)

    variants.append(("hdr-crc-both", flip(flip(base, 64 * 1024 + 20), 128 * 1024 + 20)))
    variants.append(("hdr-sig-both", both_headers(lambda b, h: b.__setitem__(slice(h, h + 4), b"HEAD"))))
    variants.append(("hdr-version", both_headers(lambda b, h: struct.pack_into("<H", b, h + 66, 2))))
    variants.append(("hdr-logversion", both_headers(lambda b, h: struct.pack_into("<H", b, h + 64, 7))))
    variants.append(("hdr-loglen-huge", both_headers(lambda b, h: struct.pack_into("<I", b, h + 68, 0xFFF00000))))
    variants.append(("hdr-logoff-unaligned", both_headers(lambda b, h: struct.pack_into("<Q", b, h + 72, 12345))))
    variants.append(("hdr-logoff-beyond", both_headers(lambda b, h: struct.pack_into("<Q", b, h + 72, 1 << 50))))
    variants.append(("rt-sig-both", both_regions(lambda b, r: b.__setitem__(slice(r, r + 4), b"REGI"))))
    variants.append(("rt-count-huge", both_regions(lambda b, r: struct.pack_into("<I", b, r + 8, 0xFFFFFFFF))))
    variants.append(("rt-count-zero", both_regions(lambda b, r: struct.pack_into("<I", b, r + 8, 0))))
    e_bat, e_meta = reg["bat"][0], reg["meta"][0]
    variants.append(("rt-bat-beyond-eof", both_regions(lambda b, r: struct.pack_into("<Q", b, r + e_bat + 16,
                                                                                         1 << 40))))
    variants.append(("rt-bat-len-4g", both_regions(lambda b, r: struct.pack_into("<I", b, r + e_bat + 24,
                                                                                     0xFFF00000))))
    variants.append(("rt-bat-unaligned", both_regions(lambda b, r: struct.pack_into("<Q", b, r + e_bat + 16,
                                                                                        (1 << 20) + 4096))))
    variants.append(("rt-meta-overlaps-header", both_regions(lambda b, r: struct.pack_into("<Q", b, r + e_meta + 16,
                                                                                               0))))
    variants.append(("rt-meta-len-zero", both_regions(lambda b, r: struct.pack_into("<I", b, r + e_meta + 24, 0))))
    variants.append(("rt-unknown-required", both_regions(lambda b, r: b.__setitem__(slice(r + e_bat, r + e_bat + 16),
                                                                                      b"\x42" * 16))))
    variants.append(("rt-dup-entry", both_regions(lambda b, r: b.__setitem__(slice(r + e_meta, r + e_meta + 16),
                                                                               bytes(b[r + e_bat:r + e_bat + 16])))))
    variants.append(("meta-sig", put(base, meta_off, b"metadatx")))
    variants.append(("meta-count-huge", put(base, meta_off + 10, struct.pack("<H", 0xFFFF))))
    variants.append(("meta-count-zero", put(base, meta_off + 10, struct.pack("<H", 0))))
    p = items["params"]
    variants.append(("meta-item-len-4g", put(base, p + 20, struct.pack("<I", 0xFFFFFFFF))))
    variants.append(("meta-item-off-4g", put(base, p + 16, struct.pack("<I", 0xFFFFFF00))))
    variants.append(("meta-item-off-in-table", put(base, p + 16, struct.pack("<I", 8))))
    params_data = meta_off + struct.unpack_from("<I", base, p + 16)[0]
    size_data = meta_off + struct.unpack_from("<I", base, items["size"] + 16)[0]
    lss_data = meta_off + struct.unpack_from("<I", base, items["lss"] + 16)[0]
    pss_data = meta_off + struct.unpack_from("<I", base, items["pss"] + 16)[0]
    variants.append(("block-size-zero", put(base, params_data, struct.pack("<I", 0))))
    variants.append(("block-size-odd", put(base, params_data, struct.pack("<I", 3 << 20 | 1))))
    variants.append(("block-size-4g", put(base, params_data, struct.pack("<I", 0x80000000))))
    variants.append(("disk-size-zero", put(base, size_data, struct.pack("<Q", 0))))
    variants.append(("disk-size-huge", put(base, size_data, struct.pack("<Q", 1 << 62))))
    variants.append(("disk-size-unaligned", put(base, size_data, struct.pack("<Q", (8 << 20) + 3))))
    variants.append(("lss-1000", put(base, lss_data, struct.pack("<I", 1000))))
    variants.append(("pss-3", put(base, pss_data, struct.pack("<I", 3))))
    variants.append(("meta-drop-size-item", put(base, items["size"], b"\x77" * 16)))
    variants.append(("meta-dup-item", put(base, items["lss"], bytes(base[items["pss"]:items["pss"] + 16]))))
    variants.append(("bat-beyond-eof", put(base, bat_off, struct.pack("<Q", (1 << 40) | 6))))
    variants.append(("bat-state-7", put(base, bat_off, struct.pack("<Q", (bytes(base[bat_off:bat_off + 8])[0] & ~7) | 7))))
    variants.append(("bat-into-header", put(base, bat_off, struct.pack("<Q", (0 << 20) | 6))))
    variants.append(("bat-all-ff", put(base, bat_off, b"\xff" * 64)))
    variants.append(("random", random.Random(7).randbytes(len(base) // 16)))
    cases = []
    for name, data in variants:
        if not data.startswith(b"vhdxfile"):  # `convert` would (rightly) take it as a raw image
            cases.append(Case(f"vhdx-{name}", "vhdx", {"in.vhdx": data}, ["vhdx", "check", "{case}/in.vhdx"]))
            continue
        cases.append(Case(f"vhdx-{name}", "vhdx", {"in.vhdx": data},
                          ["vhdx", "convert", "{case}/in.vhdx", "{case}/out.raw"], outputs=["out.raw"]))
    # a few through `inspect` and `vhdx check` too
    for name, data in variants[::6]:
        if not data.startswith(b"vhdxfile"):
            continue
        cases.append(Case(f"vhdx-check-{name}", "vhdx", {"in.vhdx": data}, ["vhdx", "check", "{case}/in.vhdx"]))
    return cases


def _gpt_fix(b: bytearray, hdr: int, ss: int = 512) -> None:
    """Recompute a GPT header's entry-array CRC and header CRC."""
    hsize = struct.unpack_from("<I", b, hdr + 12)[0]
    ent_lba, n, esz = struct.unpack_from("<QII", b, hdr + 72)
    if 0 < n * esz <= 1 << 20 and ent_lba * ss + n * esz <= len(b):
        struct.pack_into("<I", b, hdr + 88, binascii.crc32(bytes(b[ent_lba * ss:ent_lba * ss + n * esz])))
    hsize = hsize if 92 <= hsize <= 512 else 92
    struct.pack_into("<I", b, hdr + 16, 0)
    struct.pack_into("<I", b, hdr + 16, binascii.crc32(bytes(b[hdr:hdr + hsize])))


def gpt_cases(art: Artifacts) -> list[Case]:
    base = art["gpt.img"].read_bytes()
    ss = 512
    backup_hdr = len(base) - ss
    backup_entries = struct.unpack_from("<Q", base, backup_hdr + 72)[0] * ss
    prim_entries = 2 * ss

    def both(fn, fix: bool = True) -> bytes:
        b = bytearray(base)
        for h, e in ((ss, prim_entries), (backup_hdr, backup_entries)):
            fn(b, h, e)
            if fix:
                _gpt_fix(b, h)
        return bytes(b)

    v: list[tuple[str, bytes]] = []
    v.append(("crc-both", flip(flip(base, ss + 30), backup_hdr + 30)))
    v.append(("sig-both", both(lambda b, h, e: b.__setitem__(slice(h, h + 8), b"EFI PART".lower()), fix=False)))
    v.append(("hdrsize-huge", both(lambda b, h, e: struct.pack_into("<I", b, h + 12, 0xFFFFFFFF))))
    v.append(("hdrsize-small", both(lambda b, h, e: struct.pack_into("<I", b, h + 12, 20))))
    v.append(("entries-count-huge", both(lambda b, h, e: struct.pack_into("<I", b, h + 80, 0x7FFFFFFF))))
    v.append(("entry-size-zero", both(lambda b, h, e: struct.pack_into("<I", b, h + 84, 0))))
    v.append(("entry-size-odd", both(lambda b, h, e: struct.pack_into("<I", b, h + 84, 129))))
    v.append(("entry-size-huge", both(lambda b, h, e: struct.pack_into("<I", b, h + 84, 1 << 30))))
    v.append(("entries-lba-beyond", both(lambda b, h, e: struct.pack_into("<Q", b, h + 72, 1 << 40))))
    v.append(("first-gt-last", both(lambda b, h, e: struct.pack_into("<QQ", b, h + 40, 8000, 100))))
    v.append(("part-end-beyond-disk", both(lambda b, h, e: struct.pack_into("<Q", b, e + 40, 1 << 40))))
    v.append(("part-start-gt-end", both(lambda b, h, e: struct.pack_into("<QQ", b, e + 32, 6000, 3000))))
    v.append(("part-start-zero", both(lambda b, h, e: struct.pack_into("<Q", b, e + 32, 0))))
    v.append(("part-overlap", both(lambda b, h, e: (b.__setitem__(slice(e + 128, e + 256), bytes(b[e:e + 128])),
                                                    b.__setitem__(slice(e + 128 + 16, e + 128 + 32), b"\x33" * 16)))))
    v.append(("entries-crc-only", both(lambda b, h, e: b.__setitem__(e + 60, b[e + 60] ^ 0x41), fix=False)))
    v.append(("revision", both(lambda b, h, e: struct.pack_into("<I", b, h + 8, 0x00020000))))
    v.append(("mbr-sig-and-gpt-gone", put(put(put(base, 510, b"\0\0"), ss, bytes(ss)), backup_hdr, bytes(ss))))
    mbr = bytearray(base)
    struct.pack_into("<BBBBBBBBII", mbr, 446, 0x80, 0, 0, 0, 0x07, 0, 0, 0, 2048, 0xFFFFFFF0)
    mbr[ss:3 * ss] = bytes(2 * ss)
    mbr[backup_hdr:] = bytes(ss)
    v.append(("mbr-part-beyond-disk", bytes(mbr)))
    mbr2 = bytearray(mbr)
    struct.pack_into("<II", mbr2, 446 + 8, 2048, 4096)
    struct.pack_into("<BBBBBBBBII", mbr2, 446 + 16, 0, 0, 0, 0, 0x07, 0, 0, 0, 3000, 4096)
    v.append(("mbr-overlap", bytes(mbr2)))
    mbr3 = bytearray(mbr)
    struct.pack_into("<BBBBBBBBII", mbr3, 446, 0, 0, 0, 0, 0x05, 0, 0, 0, 2048, 4000)
    struct.pack_into("<BBBBBBBBII", mbr3, 2048 * ss + 446, 0, 0, 0, 0, 0x05, 0, 0, 0, 0, 4000)
    mbr3[2048 * ss + 510:2048 * ss + 512] = b"\x55\xaa"
    v.append(("mbr-extended-loop", bytes(mbr3)))
    v += [(n, d) for n, d in truncations(base, (ss + 10, 2 * ss + 64))]
    cases = []
    for name, data in v:
        cases.append(Case(f"gpt-{name}", "gpt", {"disk.img": data}, ["bitlocker", "info", "{case}/disk.img", "--partition", "1"]))
    return cases


def _fve_offsets(vol: bytes) -> tuple[int, int, int]:
    return struct.unpack_from("<QQQ", vol, 0xB0)


def _fve_covered(b: bytes, off: int) -> int:
    from templatetool.bitlocker import structs as S

    h = S.BlockHeader.parse(bytes(b[off:off + 64]))
    return h.header_size * 16


def fve_cases(art: Artifacts) -> list[Case]:
    """FVE metadata: the same corruption in all three copies (one bad copy is legitimately tolerated)."""
    vol = art["bl.img"].read_bytes()
    offs = _fve_offsets(vol)
    cov = _fve_covered(vol, offs[0])

    def all_copies(fn, fix: bool = True) -> bytes:
        b = bytearray(vol)
        for o in offs:
            fn(b, o)
            if fix:
                c = _fve_covered(b, o) if 112 <= _fve_covered(b, o) <= 65536 - 8 else cov
                struct.pack_into("<I", b, o + c + 4, binascii.crc32(bytes(b[o:o + c])))
        return bytes(b)

    v: list[tuple[str, bytes]] = []
    v.append(("boot-sig", put(vol, 3, b"-FVE-FX-")))
    v.append(("boot-offsets-beyond", put(vol, 0xB0, struct.pack("<QQQ", 1 << 50, 1 << 51, 1 << 52))))
    v.append(("boot-offsets-zero", put(vol, 0xB0, bytes(24))))
    v.append(("boot-offsets-unaligned", put(vol, 0xB0, struct.pack("<QQQ", offs[0] + 3, offs[1] + 3, offs[2] + 3))))
    v.append(("boot-sector-size", put(vol, 0x0B, struct.pack("<H", 333))))
    v.append(("crc-all", bytes(all_copies(lambda b, o: b.__setitem__(o + 200, b[o + 200] ^ 0x10), fix=False))))
    v.append(("sig-all", all_copies(lambda b, o: b.__setitem__(slice(o, o + 8), b"-FVE-FX-"))))
    v.append(("version-1", all_copies(lambda b, o: struct.pack_into("<H", b, o + 10, 1))))
    v.append(("header-size-huge", all_copies(lambda b, o: struct.pack_into("<H", b, o + 8, 0xFFFF), fix=False)))
    v.append(("state-unknown", all_copies(lambda b, o: struct.pack_into("<H", b, o + 12, 99))))
    v.append(("encsize-zero", all_copies(lambda b, o: struct.pack_into("<Q", b, o + 16, 0))))
    v.append(("encsize-huge", all_copies(lambda b, o: struct.pack_into("<Q", b, o + 16, 1 << 62))))
    v.append(("vsectors-huge", all_copies(lambda b, o: struct.pack_into("<I", b, o + 28, 0xFFFFFF))))
    v.append(("vho-beyond", all_copies(lambda b, o: struct.pack_into("<Q", b, o + 56, 1 << 45))))
    v.append(("ds-size-mismatch", all_copies(lambda b, o: struct.pack_into("<I", b, o + 64 + 12, 0x1234))))
    v.append(("ds-size-huge", all_copies(lambda b, o: struct.pack_into("<II", b, o + 64, 0xFFFFFF, 1) or
                                         struct.pack_into("<I", b, o + 64 + 12, 0xFFFFFF))))
    v.append(("ds-method-unknown", all_copies(lambda b, o: struct.pack_into("<H", b, o + 64 + 36, 0x7777))))
    v.append(("entry-size-zero", all_copies(lambda b, o: struct.pack_into("<H", b, o + 112, 0))))
    v.append(("entry-size-huge", all_copies(lambda b, o: struct.pack_into("<H", b, o + 112, 0xFFFF))))
    v.append(("entry-size-short", all_copies(lambda b, o: struct.pack_into("<H", b, o + 112, 4))))
    v.append(("entries-garbage", all_copies(lambda b, o: b.__setitem__(slice(o + 112, o + cov),
                                                                        random.Random(3).randbytes(cov - 112)))))
    v.append(("no-entries", all_copies(lambda b, o: b.__setitem__(slice(o + 112, o + cov), bytes(cov - 112)))))
    v.append(("validation-flip-all", all_copies(lambda b, o: b.__setitem__(o + cov + 40, b[o + cov + 40] ^ 1))))
    v.append(("copies-differ-offsets", all_copies(lambda b, o: struct.pack_into("<Q", b, o + 32, offs[0] + 4096))))
    v.append(("zero-metadata", all_copies(lambda b, o: b.__setitem__(slice(o, o + 65536), bytes(65536)), fix=False)))
    cases = []
    for name, data in v:
        if name != "validation-flip-all":  # the validation entry needs the VMK: only unlocking checks it
            cases.append(Case(f"fve-{name}", "fve", {"vol.img": data}, ["bitlocker", "info", "{case}/vol.img"]))
        cases.append(Case(f"fve-decrypt-{name}", "fve", {"vol.img": data},
                          ["decrypt", "{case}/vol.img", "-o", "{case}/out.img", "--startup-key", "{art}/bl.bek"],
                          outputs=["out.img"]))
    return cases


def bek_cases(art: Artifacts) -> list[Case]:
    bek = art["bl.bek"].read_bytes()
    v: list[tuple[str, bytes]] = truncations(bek, (48, 56, 100))
    v.append(("size-huge", put(bek, 0, struct.pack("<I", 0xFFFFFFFF))))
    v.append(("size-zero", put(bek, 0, struct.pack("<I", 0))))
    v.append(("header-size", put(bek, 8, struct.pack("<I", 0x40))))
    v.append(("entry-size-zero", put(bek, 48, struct.pack("<H", 0))))
    v.append(("entry-size-huge", put(bek, 48, struct.pack("<H", 0xFFFF))))
    v.append(("entry-type", put(bek, 52, struct.pack("<H", 0x99))))
    v.append(("nested-size-zero", put(bek, 48 + 8 + 24, struct.pack("<H", 0))))
    v.append(("key-flip", flip(bek, len(bek) - 5)))
    v.append(("key-short", put(bek, len(bek) - 44, struct.pack("<H", 20))))
    v.append(("text", b"not a bek file\n"))
    v.append(("random", random.Random(11).randbytes(156)))
    v.append(("pem-instead", art["signer.pem"].read_bytes()))
    return [Case(f"bek-{n}", "bek", {"key.bek": d},
                 ["decrypt", "{art}/bl.img", "-o", "{case}/out.img", "--startup-key", "{case}/key.bek"],
                 outputs=["out.img"]) for n, d in v]


def recovery_password_cases(art: Artifacts) -> list[Case]:
    rp = art.recovery_password
    groups = rp.split("-")
    bad = {
        "empty-ish": " ",
        "seven-groups": "-".join(groups[:7]),
        "nine-groups": rp + "-000000",
        "letters": rp.replace(groups[2], "12a456"),
        "not-mult-11": "-".join(groups[:3] + ["000001"] + groups[4:]),
        "group-too-big": "-".join(groups[:3] + ["720896"] + groups[4:]),
        "superscript-digits": "²" * 48,
        "arabic-indic-digits": "٠١٢٣٤٥" * 8,
        "fullwidth-digits": "０" * 48,
        "very-long": "1" * 100000,
        "nul-byte": rp[:10] + "\x01" + rp[11:],
        "wrong-but-valid": "-".join(["000000"] * 8),
        "sql": "'; DROP TABLE --",
    }
    return [Case(f"recovery-{n}", "recovery-password", {}, ["decrypt", "{art}/bl.img", "-o", "{case}/out.img",
                                                            "--recovery-password-env", "TT_RP"],
                 env={"TT_RP": s}, outputs=["out.img"]) for n, s in bad.items()] + [
        Case(f"recovery-file-{n}", "recovery-password", {"rp.txt": s.encode("utf-8", "surrogatepass")},
             ["decrypt", "{art}/bl.img", "-o", "{case}/out.img", "--recovery-password-file", "{case}/rp.txt"],
             outputs=["out.img"]) for n, s in list(bad.items())[:6]] + [
        Case("recovery-file-binary", "recovery-password", {"rp.txt": b"\xff\xfe\x00garbage\x80"},
             ["decrypt", "{art}/bl.img", "-o", "{case}/out.img", "--recovery-password-file", "{case}/rp.txt"],
             outputs=["out.img"])]


def tpm_blob_cases(art: Artifacts) -> list[Case]:
    blob = art["sealed.bin"].read_bytes()
    v = truncations(blob, (2, 4, 10, 40, 100, len(blob) - 20))
    r = random.Random(13)
    for i in range(6):
        off = r.randrange(min(64, len(blob)))
        v.append((f"flip{off}", flip(blob, off)))
    v.append(("len-huge-u16", put(blob, 0, b"\xff\xff")))
    v.append(("len-huge-u32", put(blob, 0, b"\xff\xff\xff\xff")))
    v.append(("zeros", bytes(len(blob))))
    v.append(("trailing-junk", blob + b"\x00junk" * 20))
    v.append(("kp-instead", art["vm.kp"].read_bytes()))
    # `tpm show` describes structure only; content flips are for unsealing to detect
    cases = [Case(f"tpmblob-{n}", "tpm-blob", {"blob.bin": d}, ["tpm", "show", "{case}/blob.bin"]) for n, d in v
             if not n.startswith("flip")]
    for n, d in [x for x in v if x[0].startswith("flip")] + [x for x in v[::3] if not x[0].startswith("flip")]:
        cases.append(Case(f"tpmblob-unseal-{n}", "tpm-blob", {"blob.bin": d},
                          ["tpm", "unseal", "{case}/blob.bin", "--key", "{art}/vtpm.key", "--pcr-values",
                           f"7={'11' * 32},11={'22' * 32}", "-o", "{case}/secret.out"], outputs=["secret.out"]))
    return cases


def parent_cases(art: Artifacts) -> list[Case]:
    pub = art["vtpm.pub"].read_bytes()
    v = truncations(pub, (2, 4, 6, 10, 12, 40))
    v.append(("size-mismatch", put(pub, 0, struct.pack(">H", len(pub)))))
    v.append(("size-huge", put(pub, 0, b"\xff\xff")))
    v.append(("type-unknown", put(pub, 2, b"\x00\x99")))
    v.append(("namealg-unknown", put(pub, 4, b"\x00\x77")))
    v.append(("namealg-null", put(pub, 4, b"\x00\x10")))
    v.append(("policy-len-huge", put(pub, 10, b"\xff\xff")))
    v.append(("trailing", pub + b"\x00" * 9))
    v.append(("zeros", bytes(len(pub))))
    v.append(("pem-garbage", b"-----BEGIN PUBLIC KEY-----\nAAAA!!!!\n-----END PUBLIC KEY-----\n"))
    v.append(("pem-privkey", art["signer.key.pem"].read_bytes()))
    v.append(("pem-cert-truncated", art["signer.pem"].read_bytes()[:300]))
    return [Case(f"parent-{n}", "tpm-parent", {"parent.bin": d}, ["tpm", "parent", "{case}/parent.bin"]) for n, d in v]


def tcg_log_cases(art: Artifacts) -> list[Case]:
    log = art["vm-reference.tcglog"].read_bytes()
    first_len = 32 + struct.unpack_from("<I", log, 28)[0]
    v = truncations(log, (20, 31, 40, first_len + 6, first_len + 20))
    v.append(("first-event-size-huge", put(log, 28, struct.pack("<I", 0xFFFFFFF0))))
    v.append(("spec-sig", put(log, 32, b"Spec ID Event02\0")))
    v.append(("spec-alg-count-huge", put(log, 32 + 24, struct.pack("<I", 0x7FFFFFFF))))
    v.append(("spec-alg-size-zero", put(log, 32 + 28 + 2, struct.pack("<H", 0))))
    v.append(("spec-alg-size-huge", put(log, 32 + 28 + 2, struct.pack("<H", 0xFFFF))))
    v.append(("ev2-pcr-99", put(log, first_len, struct.pack("<I", 99))))
    v.append(("ev2-digest-count-huge", put(log, first_len + 8, struct.pack("<I", 0xFFFFFFFF))))
    v.append(("ev2-digest-count-zero-huge-size", put(log, first_len + 8, struct.pack("<I", 0))))
    v.append(("ev2-unknown-alg", put(log, first_len + 12, struct.pack("<H", 0x0099))))
    v.append(("ev2-size-huge", put(log, len(log) - len(b"BitLocker") - 4, struct.pack("<I", 0xFFFFFFF0))))
    v.append(("sha1-event-size-huge", put(put(log[:32], 4, struct.pack("<I", 1)), 28, b"\xff\xff\xff\x7f")))
    v.append(("random", random.Random(17).randbytes(4096)))
    v.append(("ff", b"\xff" * 64))
    return [Case(f"tcglog-{n}", "tcg-log", {"log.bin": d}, ["tpm", "pcrs", "{case}/log.bin"]) for n, d in v]


def _der_variants(der: bytes, seed: int) -> list[tuple[str, bytes]]:
    v = truncations(der, (2, 4, 30, len(der) - 40))
    v.append(("tag", put(der, 0, b"\x31")))
    v.append(("len-indefinite", put(der, 1, b"\x80")))
    v.append(("len-huge", der[:1] + b"\x84\xff\xff\xff\xff" + der[4:]))
    v.append(("len-9bytes", der[:1] + b"\x89" + b"\xff" * 9 + der[4:]))
    v.append(("trailing", der + b"\x00\x00"))
    r = random.Random(seed)
    for i in range(6):
        off = r.randrange(len(der))
        v.append((f"flip{off}", flip(der, off, 1 << r.randrange(8))))
    v.append(("sig-flip", flip(der, len(der) - 10)))
    v.append(("pem-wrapped", b"-----BEGIN PKCS7-----\n" + binascii.b2a_base64(der) + b"-----END PKCS7-----\n"))
    v.append(("zeros", bytes(len(der))))
    return v


def vsc_cases(art: Artifacts) -> list[Case]:
    der = art["template.vsc"].read_bytes()
    v = _der_variants(der, 19)
    v.append(("pdk-instead", art["tenant.pdk"].read_bytes()))
    return [Case(f"vsc-{n}", "vsc", {"t.vsc": d}, ["vsc", "show", "{case}/t.vsc"]) for n, d in v]


def pdk_cases(art: Artifacts) -> list[Case]:
    der = art["tenant.pdk"].read_bytes()
    v = _der_variants(der, 23)
    v.append(("vsc-instead", art["template.vsc"].read_bytes()))
    cases = [Case(f"pdk-{n}", "pdk", {"t.pdk": d}, ["pdk", "verify", "{case}/t.pdk"]) for n, d in v]
    for n, d in v[::4]:
        cases.append(Case(f"pdk-show-{n}", "pdk", {"t.pdk": d},
                          ["pdk", "show", "{case}/t.pdk", "--key", "{demo}/owner", "--extract", "{case}/x"],
                          outputs=["x"]))
    return cases


def _xml_variants(xml: bytes, seed: int, root_tag: bytes) -> list[tuple[str, bytes]]:
    v = truncations(xml, (10, 60, 200))
    v.append(("not-utf8", xml.replace(b"<", b"\xff<", 1)))
    v.append(("xxe", b'<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n<r>&x;</r>'))
    v.append(("billion-laughs", b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
              + b"".join(b'<!ENTITY %s "%s">' % (bytes([98 + i]), (b"&%s;" % bytes([97 + i])) * 10) for i in range(9))
              + b']><l>&j;</l>'))
    v.append(("doctype-in-real", xml.replace(b"?>", b'?><!DOCTYPE x [<!ENTITY e "E">]>', 1) if b"?>" in xml
              else b'<!DOCTYPE x [<!ENTITY e "E">]>' + xml))
    v.append(("wrong-root", xml.replace(root_tag, b"Bogus", 2)))
    v.append(("empty-root", b"<" + root_tag + b"/>"))
    r = random.Random(seed)
    for i in range(6):
        off = r.randrange(len(xml) // 4, len(xml))
        v.append((f"flip{off}", flip(xml, off, 1 << r.randrange(7))))
    # a base64 value replaced by garbage
    i = xml.find(b">MII")
    if i > 0:
        v.append(("b64-garbage", xml[:i + 1] + b"!!!notbase64!!!" + xml[i + 4:]))
        v.append(("b64-huge", xml[:i + 1] + b"A" * (4 << 20) + xml[i + 1:]))
    v.append(("nul", xml.replace(b">", b">\x00", 1)))
    if b"Reference URI=" in xml:  # a signature element that breaks the XML-DSig schema (found by fuzzing)
        v.append(("sig-ref-bad-attr", xml.replace(b"Reference URI=", b"Reference U-I=", 1)))
    return v


def kp_cases(art: Artifacts) -> list[Case]:
    xml = art["vm.kp"].read_bytes()
    v = _xml_variants(xml, 29, b"Protector")
    v.append(("pdk-instead", art["tenant.pdk"].read_bytes()))
    cases = [Case(f"kp-{n}", "kp", {"vm.kp": d}, ["kp", "show", "{case}/vm.kp"]) for n, d in v]
    for n, d in v[::4]:
        cases.append(Case(f"kp-unwrap-{n}", "kp", {"vm.kp": d},
                          ["kp", "unwrap", "{case}/vm.kp", "--guardian", "{demo}/fabric", "-o", "{case}/secret.out"],
                          outputs=["secret.out"]))
    return cases


def guardian_xml_cases(art: Artifacts) -> list[Case]:
    xml = art["fabric.xml"].read_bytes()
    root = xml.split(b"<", 2)[2].split(b" ", 1)[0].split(b">", 1)[0] if xml.startswith(b"<?") else b"Guardian"
    v = _xml_variants(xml, 31, root.split(b":")[-1])
    return [Case(f"guardian-xml-{n}", "guardian-xml", {"g.xml": d},
                 ["guardian", "import", "{case}/g.xml", "-o", "{case}/imported", "--allow-untrusted-root"],
                 outputs=["imported"]) for n, d in v]


def evidence_cases(art: Artifacts) -> list[Case]:
    import json

    ev = art["evidence.json"].read_bytes()
    doc = json.loads(ev)
    v = truncations(ev)
    v.append(("not-json", b"{evidence: nope"))
    v.append(("list", b"[1,2,3]"))
    v.append(("null", b"null"))
    v.append(("sig-not-b64", json.dumps({**doc, "signature": "!!"}).encode()))
    v.append(("sig-flip", json.dumps({**doc, "signature": doc["signature"][:-6] + ("A" if doc["signature"][-6] != "A" else "B") + doc["signature"][-5:]}).encode()))
    v.append(("alg-unknown", json.dumps({**doc, "signature_algorithm": "rot13"}).encode()))
    body = dict(doc["evidence"])
    v.append(("host-key-garbage", json.dumps({**doc, "evidence": {**body, "host_key": "-----BEGIN PUBLIC KEY-----\nxx\n"}}).encode()))
    v.append(("host-int", json.dumps({**doc, "evidence": {**body, "host": 5}}).encode()))
    v.append(("created-garbage", json.dumps({**doc, "evidence": {**body, "created": "yesterday"}}).encode()))
    v.append(("version-2", json.dumps({**doc, "evidence": {**body, "version": 2}}).encode()))
    v.append(("tcg-log-garbage", json.dumps({**doc, "evidence": {**body, "tcg_log": "AAAA"}}).encode()))
    v.append(("deep-nesting", b"[" * 100000 + b"]" * 100000))
    v.append(("huge", b'{"evidence": "' + b"A" * (32 << 20) + b'"}'))
    v.append(("nan", ev.replace(b'"version": 1', b'"version": NaN')))
    v.append(("binary", random.Random(37).randbytes(512)))
    return [Case(f"evidence-{n}", "host-evidence", {"ev.json": d},
                 ["hgs", "attest", "{demo}/fabric", "{case}/ev.json", "-o", "{case}/hc.pem"], outputs=["hc.pem"])
            for n, d in v]


def attestation_policy_cases(art: Artifacts) -> list[Case]:
    import json

    pol = art["attestation.json"].read_bytes()
    doc = json.loads(pol)
    v = truncations(pol)
    v.append(("not-json", b"{{{"))
    v.append(("format", json.dumps({**doc, "format": "other"}).encode()))
    v.append(("host-keys-list", json.dumps({**doc, "host_keys": [1, 2]}).encode()))
    v.append(("host-keys-garbage-pem", json.dumps({**doc, "host_keys": {"hyperv-host-01": "garbage"}}).encode()))
    v.append(("baseline-bad-pcr", json.dumps({**doc, "pcr_baseline": {"x": "00"}}).encode()))
    v.append(("hours-string", json.dumps({**doc, "health_hours": "many"}).encode()))
    v.append(("hours-huge", json.dumps({**doc, "health_hours": 10 ** 30}).encode()))
    v.append(("hours-negative", json.dumps({**doc, "health_hours": -5}).encode()))
    v.append(("binary", b"\xff\xfe\x00\x01"))
    return [Case(f"attestation-{n}", "attestation-policy", {"fabric/attestation.json": d},
                 ["hgs", "attest", "{case}/fabric", "{art}/evidence.json", "-o", "{case}/hc.pem"],
                 copy={"fabric": "{demo}/fabric"}, outputs=["hc.pem"]) for n, d in v]


def certificate_cases(art: Artifacts) -> list[Case]:
    pem = art["signer.pem"].read_bytes()
    der = art["cert.der"].read_bytes()
    v: list[tuple[str, bytes]] = [("empty", b""), ("pem-trunc", pem[:len(pem) // 2]),
                                  ("pem-bad-b64", pem.replace(b"M", b"!", 3)), ("der-trunc", der[:100]),
                                  ("der-flip-tbs", flip(der, 40)), ("der-len-huge", der[:1] + b"\x84\xff\xff\xff\xff" + der[4:]),
                                  ("random", random.Random(41).randbytes(800)), ("privkey", art["signer.key.pem"].read_bytes()),
                                  ("two-begin", b"-----BEGIN CERTIFICATE-----\n" + pem)]
    cases = [Case(f"cert-trust-{n}", "certificate", {"c.pem": d},
                  ["pdk", "verify", "{demo}/tenant.pdk", "--trust", "{case}/c.pem"]) for n, d in v]
    cases += [Case(f"cert-vsc-trust-{n}", "certificate", {"c.pem": d},
                   ["vsc", "verify", "{demo}/template.vhdx", "--trust", "{case}/c.pem"]) for n, d in v[:4]]
    cases += [Case(f"cert-guardian-show-{n}", "certificate", {"g/signing.pem": d},
                   ["guardian", "show", "{case}/g"], copy={"g": "{demo}/owner"}) for n, d in v[:5]]
    return cases


def pfx_cases(art: Artifacts) -> list[Case]:
    pfx = art["signer.pfx"].read_bytes()
    cases = []
    for n, pw in (("wrong", "nope"), ("case", PFX_PASSWORD.upper()), ("trailing-space", PFX_PASSWORD + " "),
                  ("unicode", "pässwörd")):
        cases.append(Case(f"pfx-protect-{n}", "pfx", {}, ["protect", str(GOLDEN), "-o", "{case}/t.vhdx", "--name", "X",
                                                         "--version", "1.0.0.0", "--signer", "{art}/corpus-signer.pfx",
                                                         "--password-env", "TT_PW"], env={"TT_PW": pw},
                          outputs=["t.vhdx"]))
    cases.append(Case("pfx-protect-unset-env", "pfx", {}, ["protect", str(GOLDEN), "-o", "{case}/t.vhdx", "--name", "X",
                                                          "--version", "1.0.0.0", "--signer", "{art}/corpus-signer.pfx",
                                                          "--password-env", "TT_PW_UNSET"], outputs=["t.vhdx"]))
    for n, d in (("trunc", pfx[:len(pfx) // 2]), ("flip", flip(pfx, len(pfx) // 2)), ("pem", art["signer.pem"].read_bytes())):
        cases.append(Case(f"pfx-protect-{n}", "pfx", {"s.pfx": d},
                          ["protect", str(GOLDEN), "-o", "{case}/t.vhdx", "--name", "X", "--version", "1.0.0.0",
                           "--signer", "{case}/s.pfx", "--password-env", "TT_PW"], env={"TT_PW": PFX_PASSWORD},
                          outputs=["t.vhdx"]))
    for n, pw in (("wrong", "nope"), ("empty-ish", " ")):
        cases.append(Case(f"pfx-guardian-{n}", "pfx", {}, ["kp", "unwrap", "{demo}/vm.kp", "--guardian",
                                                           "{art}/locked-guardian", "--password-env", "TT_GPW",
                                                           "-o", "{case}/s.out"], env={"TT_GPW": pw},
                          outputs=["s.out"]))
    cases.append(Case("pfx-guardian-no-env", "pfx", {}, ["pdk", "show", "{demo}/tenant.pdk", "--key",
                                                         "{art}/locked-guardian", "--extract", "{case}/x"],
                      outputs=["x"]))
    return cases


def recipe_cases(art: Artifacts) -> list[Case]:
    d = art.demo
    good = f"""
[template]
golden = "{GOLDEN}"
output = "out/template.vhdx"
name = "Srv"
version = "1.2.3.4"
signer = "pem:{d / 'signer.key.pem'},{d / 'signer.pem'}"

[pdk]
output = "out/tenant.pdk"
owner = "{d / 'owner'}"
guardians = ["{d / 'fabric'}"]
version_rule = "ge"
policy = "shielded"
allow_untrusted_root = true

[shield]
output = "out/vm.vhdx"
pcrs = [7, 11]
tcg_log = "{d / 'vm-reference.tcglog'}"

[report]
output = "out/report.json"
"""
    bad = {
        "syntax": good.replace("[pdk]", "[pdk"),
        "version-int": good.replace('version = "1.2.3.4"', "version = 1234"),
        "version-bad": good.replace('version = "1.2.3.4"', 'version = "1.2.3.99999"'),
        "pcrs-string": good.replace("pcrs = [7, 11]", 'pcrs = "7,11"'),
        "pcrs-huge": good.replace("pcrs = [7, 11]", "pcrs = [7, 1000000]"),
        "unknown-key": good.replace("[report]", "[report]\nbogus = 1"),
        "golden-missing": good.replace(str(GOLDEN), "/nonexistent/golden.vhdx"),
        "signer-bad": good.replace("signer = \"pem:", "signer = \"nope:"),
        "policy-unknown": good.replace('policy = "shielded"', 'policy = "lenient"'),
        "rule-unknown": good.replace('version_rule = "ge"', 'version_rule = "approx"'),
        "guardians-int": good.replace(f'guardians = ["{d / "fabric"}"]', "guardians = 5"),
        "binary": "\udcff\udcfe garbage",
        "empty": "",
        "tcg-log-missing": good.replace(str(d / "vm-reference.tcglog"), "/nonexistent.log"),
        "output-dir-missing": good.replace("out/report.json", "nope/nope/report.json"),
    }
    return [Case(f"recipe-{n}", "recipe", {"r.toml": t.encode("utf-8", "surrogateescape"), "out/.keep": b""},
                 ["build", "{case}/r.toml"], outputs=["out/template.vhdx", "out/tenant.pdk", "out/vm.vhdx",
                                                       "out/report.json"]) for n, t in bad.items()]


GENERATORS = [vhdx_cases, gpt_cases, fve_cases, bek_cases, recovery_password_cases, tpm_blob_cases, parent_cases,
              tcg_log_cases, vsc_cases, pdk_cases, kp_cases, guardian_xml_cases, evidence_cases,
              attestation_policy_cases, certificate_cases, pfx_cases, recipe_cases]


def build_corpus(art: Artifacts) -> list[Case]:
    """Every malformed case, in a fixed order (deterministic for given artifacts)."""
    out: list[Case] = []
    for g in GENERATORS:
        out += g(art)
    ids = [c.id for c in out]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return out


def seed_inputs(art: Artifacts) -> dict[str, list[bytes]]:
    """Valid + malformed inputs per parser kind (for fuzz corpora)."""
    seeds: dict[str, list[bytes]] = {}
    valid = {"vhdx": art["small.vhdx"].read_bytes()[:2 << 20], "gpt": art["gpt.img"].read_bytes()[:34 * 512],
             "fve": art["bl.img"].read_bytes()[:512], "bek": art["bl.bek"].read_bytes(),
             "recovery-password": art.recovery_password.encode(), "tpm-blob": art["sealed.bin"].read_bytes(),
             "tpm-parent": art["vtpm.pub"].read_bytes(), "tcg-log": art["vm-reference.tcglog"].read_bytes(),
             "vsc": art["template.vsc"].read_bytes(), "pdk": art["tenant.pdk"].read_bytes(),
             "kp": art["vm.kp"].read_bytes(), "guardian-xml": art["fabric.xml"].read_bytes()}
    for k, v in valid.items():
        seeds.setdefault(k, []).append(v)
    for c in build_corpus(art):
        for data in c.files.values():
            if c.kind == "fve" and len(data) > 1 << 20:  # the volume header and metadata copy 1 of the case
                offs = struct.unpack_from("<QQQ", data, 0xB0)
                seeds["fve"].append(data[:512])
                if offs[0] < len(data):
                    seeds.setdefault("fve-metadata", []).append(data[offs[0]:offs[0] + 65536])
                continue
            if c.kind in ("vhdx", "gpt"):
                data = data[:2 << 20]
            if 0 < len(data) <= 2 << 20:
                seeds.setdefault(c.kind, []).append(data)
    return seeds


def main(argv: list[str] | None = None) -> int:
    """``python tests/corpus_gen.py OUTDIR``: write the corpus files (one folder per kind)."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("outdir")
    a = ap.parse_args(argv)
    out = Path(a.outdir)
    with tempfile.TemporaryDirectory() as td:
        art = make_artifacts(Path(td))
        n = 0
        for kind, items in seed_inputs(art).items():
            (out / kind).mkdir(parents=True, exist_ok=True)
            for data in items:
                (out / kind / hashlib.sha256(data).hexdigest()[:16]).write_bytes(data)
                n += 1
    print(f"{n} inputs written to {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
