"""Shielding data (PDK): ``openssl cms -verify`` accepts the owner's signature, ``openssl cms -decrypt``
opens the secret part for the owner and every guardian (RSA and EC mixed), non-recipients are
refused, qualifiers follow Microsoft's semantics, tampering and bad inputs fail cleanly."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import random
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from templatetool.catalog.document import CatalogDocument, VolumeInfo
from templatetool.catalog.qualifier import VolumeIdQualifier
from templatetool.catalog.vsc import open_vsc, sign_catalog
from templatetool.errors import CredentialError, TemplateToolError, UsageError
from templatetool.guardian import (
    Guardian,
    export_metadata,
    generate_guardian,
    save_guardian,
)
from templatetool.pdk import (
    GuardianSigner,
    NamedFile,
    SecretPart,
    check_template,
    create_pdk,
    open_pdk_secret,
    read_pdk,
)

from .conftest import assert_clean_error, require_tool, run_cli

ENV = {"TPW": "tenant-pw"}


def _vsc(name: str, version: str, signer: Guardian) -> bytes:
    doc = CatalogDocument.build(name, version, VolumeInfo(1 << 20, 512, "ntfs"), 1 << 20, [b"\0" * 32], b"\0" * 32,
                                "none")
    return sign_catalog(doc, GuardianSigner(signer))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("pdk")
    w = {"dir": d}
    for key, name, kind in (("owner", "Owner", "rsa3072"), ("a", "Fabric A", "ec-p256"), ("b", "Fabric B", "rsa3072"),
                            ("c", "Fabric C", "ec-p384"), ("out", "Outsider", "ec-p256"), ("author", "Author", "ec-p256"),
                            ("author2", "Author 2", "ec-p256")):
        g = generate_guardian(name, kind)
        save_guardian(g, d / key, ENV["TPW"])
        w[key] = g
        for role in ("signing", "encryption"):
            k = getattr(g, f"{role}_key")
            (d / f"{key}-{role}.key").write_bytes(k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            (d / f"{key}-{role}.crt").write_bytes(getattr(g, f"{role}_certificate").public_bytes(serialization.Encoding.PEM))
    (d / "t-1.2.vsc").write_bytes(_vsc("WS2022-DC", "1.2.0.0", w["author"]))
    secret = SecretPart(NamedFile("unattend.xml", b"<unattend>@ComputerName@</unattend>"),
                        [NamedFile("rdp.pfx", os.urandom(3000)), NamedFile("setup.ps1", b"Write-Host hi\r\n")],
                        {"@ComputerName@": "WEB01"})
    quals = [VolumeIdQualifier.from_vsc(open_vsc((d / "t-1.2.vsc").read_bytes()), "ge")]
    der, warnings = create_pdk(w["owner"], [w["a"], w["b"], w["c"]], quals, secret, "shielded")
    (d / "t.pdk").write_bytes(der)
    w.update(pdk=der, secret=secret, warnings=warnings)
    return w


def test_openssl_verifies_owner_signature(world):
    require_tool("openssl")
    d = world["dir"]
    cp = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(d / "t.pdk"),
                         "-CAfile", str(d / "owner-signing.crt"), "-purpose", "any", "-out", str(d / "doc.json")],
                        capture_output=True, check=False, text=True)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads((d / "doc.json").read_text())
    assert doc["format"] == "templatetool-pdk" and doc["policy"] == "shielded"
    assert [g["name"] for g in doc["guardians"]] == ["Fabric A", "Fabric B", "Fabric C"]
    # a different trust anchor is refused by openssl
    cp = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(d / "t.pdk"),
                         "-CAfile", str(d / "a-signing.crt"), "-purpose", "any", "-out", os.devnull],
                        capture_output=True, check=False, text=True)
    assert cp.returncode != 0


def _secret_env(world) -> str:
    d = world["dir"]
    doc = json.loads(subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(d / "t.pdk"),
                                     "-noverify"], capture_output=True, check=True).stdout)
    p = d / "secret.der"
    p.write_bytes(base64.b64decode(doc["secret_part"]))
    return str(p)


@pytest.mark.parametrize("who", ["owner", "a", "b", "c"])
def test_openssl_decrypts_secret_for_owner_and_each_guardian(world, who):
    require_tool("openssl")
    d = world["dir"]
    env = _secret_env(world)
    cp = subprocess.run(["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", env,
                         "-recip", str(d / f"{who}-encryption.crt"), "-inkey", str(d / f"{who}-encryption.key")],
                        capture_output=True, check=False)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == world["secret"].to_bytes()
    sp = json.loads(cp.stdout)
    assert base64.b64decode(sp["other_files"][0]["data"]) == world["secret"].other_files[0].data
    ours = open_pdk_secret(read_pdk(world["pdk"]), world[who].encryption_key,
                           world[who].encryption_certificate)
    assert ours.specialization_values == {"@ComputerName@": "WEB01"}
    assert ours.answer_file.data == world["secret"].answer_file.data


def test_non_recipient_refused_by_openssl_and_us(world):
    require_tool("openssl")
    d = world["dir"]
    env = _secret_env(world)
    cp = subprocess.run(["openssl", "cms", "-decrypt", "-binary", "-inform", "DER", "-in", env,
                         "-recip", str(d / "out-encryption.crt"), "-inkey", str(d / "out-encryption.key")],
                        capture_output=True, check=False)
    assert cp.returncode != 0 and b"WEB01" not in cp.stdout
    with pytest.raises(CredentialError):
        open_pdk_secret(read_pdk(world["pdk"]), world["out"].encryption_key, world["out"].encryption_certificate)
    cp = run_cli("pdk", "show", str(d / "t.pdk"), "--key", str(d / "out"), "--password-env", "TPW", env=ENV)
    assert_clean_error(cp, 5)


def test_mixed_recipients_and_clear_part(world):
    info = read_pdk(world["pdk"])
    kinds = sorted(r["kind"] for r in info.to_json()["secret_part"]["recipients"])
    assert kinds == ["kari", "kari", "ktri", "ktri"]  # EC (a, c) and RSA (owner, b)
    assert info.owner.name == "Owner" and info.policy == "shielded"
    assert world["warnings"] == []  # every placeholder has a value, guardians and a qualifier are given


def test_qualifier_matrix(world):
    """Name and signer must match exactly; only then does the version rule count (Microsoft)."""
    d = world["dir"]
    base = (1, 2, 0, 0)
    cats = {}
    for name in ("WS2022-DC", "WS2022-DC2"):
        for signer in ("author", "author2"):
            for ver in ("1.1.0.0", "1.2.0.0", "1.3.0.0"):
                cats[(name, signer, ver)] = _vsc(name, ver, world[signer])
    author_thumb = open_vsc(cats[("WS2022-DC", "author", "1.2.0.0")]).signer_thumbprint
    for rule in ("eq", "ge", "gt"):
        q = VolumeIdQualifier("WS2022-DC", author_thumb, base, rule)
        der, _ = create_pdk(world["owner"], [world["a"]], [q], SecretPart(), "encryption-supported")
        info = read_pdk(der)
        for (name, signer, ver), vsc in cats.items():
            v = tuple(int(x) for x in ver.split("."))
            expect = name == "WS2022-DC" and signer == "author" and {"eq": v == base, "ge": v >= base, "gt": v > base}[rule]
            rep = check_template(info, vsc)
            assert rep["qualified"] == expect, (rule, name, signer, ver, rep["reason"])
            if not expect:
                if name != "WS2022-DC":
                    assert "name" in rep["reason"]
                elif signer != "author":
                    assert "signer" in rep["reason"]
                else:
                    assert "version" in rep["reason"]
    # CLI: exit 6 with the reason when the template does not qualify
    (d / "t-1.1.vsc").write_bytes(cats[("WS2022-DC", "author", "1.1.0.0")])
    (d / "other.vsc").write_bytes(cats[("WS2022-DC", "author2", "1.2.0.0")])
    cp = run_cli("pdk", "verify", str(d / "t.pdk"), "--vsc", str(d / "t-1.2.vsc"), "--owner", str(d / "owner"), "--json")
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout)["result"]
    assert out["template"]["qualified"] and out["owner_trust"].startswith("pinned")
    cp = run_cli("pdk", "verify", str(d / "t.pdk"), "--vsc", str(d / "t-1.1.vsc"))
    assert_clean_error(cp, 6)
    assert "version 1.1.0.0 is not at least 1.2.0.0" in cp.stderr
    cp = run_cli("pdk", "verify", str(d / "t.pdk"), "--vsc", str(d / "other.vsc"))
    assert_clean_error(cp, 6)
    assert "signer" in cp.stderr
    assert_clean_error(run_cli("pdk", "verify", str(d / "t.pdk"), "--owner", str(d / "a")), 4)
    assert run_cli("pdk", "verify", str(d / "t.pdk"), "--owner", str(d / "owner-signing.crt")).returncode == 0
    assert_clean_error(run_cli("pdk", "verify", str(d / "t.pdk"), "--owner", str(d / "b-signing.crt")), 4)


def test_kp_from_pdk_alone(world):
    """The PDK carries each guardian's encryption-certificate signature: a KP can be made from it."""
    from templatetool.guardian import guardian_from_certificates
    from templatetool.kp import create_kp, unwrap

    info = read_pdk(world["pdk"])
    gs = []
    for e in info.guardians:
        g = guardian_from_certificates(e.name, e.signing_certificate, e.encryption_certificate)
        g.encryption_signature = e.encryption_signature
        gs.append(g)
    secret = os.urandom(32)
    kp = create_kp(secret, world["owner"], gs)
    for who in ("a", "b", "c"):
        assert unwrap(kp, world[who]) == secret


def test_random_byte_flips_all_detected(world):
    rng = random.Random(0x7064)
    der = world["pdk"]
    for _ in range(200):
        bad = bytearray(der)
        pos = rng.randrange(len(bad))
        bad[pos] ^= rng.randrange(1, 256)
        with pytest.raises(TemplateToolError):
            read_pdk(bytes(bad))


def test_cli_new_show_and_bad_inputs(world, tmp_path):
    d = world["dir"]
    (tmp_path / "unattend.xml").write_bytes(b"<unattend>@ComputerName@ @ProductKey@</unattend>")
    (tmp_path / "f1.bin").write_bytes(os.urandom(200 * 1024))
    (tmp_path / "f2.bin").write_bytes(os.urandom(200 * 1024))
    (tmp_path / "small.txt").write_bytes(b"hello")
    meta = tmp_path / "fabric-c.xml"
    meta.write_bytes(export_metadata(world["c"], world["c"].signing_key, world["c"].signing_certificate))
    out = tmp_path / "n.pdk"
    common = ["--owner", str(d / "owner"), "--vsc", str(d / "t-1.2.vsc"), "--version-rule", "eq",
              "--answer-file", str(tmp_path / "unattend.xml"), "--password-env", "TPW"]
    cp = run_cli("pdk", "new", "-o", str(out), *common, "--guardian", str(d / "a"), "--guardian", str(meta),
                 "--allow-untrusted-root", "--other-file", str(tmp_path / "small.txt"), "--spec-value",
                 "@ComputerName@=WEB02", "--policy", "encryption-supported", env=ENV)
    assert cp.returncode == 0, cp.stderr
    assert "@ProductKey@" in cp.stderr  # warned: placeholder without a value
    cp = run_cli("pdk", "show", str(out), "--key", str(d / "c"),
                 "--password-env", "TPW", "--json", env=ENV)
    assert cp.returncode == 0, cp.stderr
    shown = json.loads(cp.stdout)["result"]
    assert shown["secret"]["specialization_values"] == {"@ComputerName@": "WEB02"}
    assert shown["policy"] == "encryption-supported"
    cp = run_cli("pdk", "show", str(out), "--key", f"pem:{d / 'a-encryption.key'},{d / 'a-encryption.crt'}",
                 "--extract", str(tmp_path / "x"), env=ENV)
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "x" / "small.txt").read_bytes() == b"hello"
    assert oct(os.stat(tmp_path / "x" / "small.txt").st_mode & 0o777) == "0o600"
    # metadata guardian with an untrusted root, without the flag
    assert_clean_error(run_cli("pdk", "new", "-o", str(tmp_path / "u.pdk"), *common, "--guardian", str(meta),
                               "--policy", "shielded", env=ENV), 6)
    # other files over 384 KB
    cp = run_cli("pdk", "new", "-o", str(tmp_path / "big.pdk"), *common, "--guardian", str(d / "a"),
                 "--other-file", str(tmp_path / "f1.bin"), "--other-file", str(tmp_path / "f2.bin"),
                 "--policy", "shielded", env=ENV)
    assert_clean_error(cp, 2)
    assert "384 KB" in cp.stderr
    assert not (tmp_path / "big.pdk").exists()
    # expired guardian certificate, refused unless --allow-expired
    old = generate_guardian("Old", "ec-p256", days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=9))
    save_guardian(old, tmp_path / "old", None)
    args = ["pdk", "new", "-o", str(tmp_path / "e.pdk"), *common, "--guardian", str(tmp_path / "old"), "--policy", "shielded"]
    cp = run_cli(*args, env=ENV)
    assert_clean_error(cp, 6)
    assert "expired" in cp.stderr and "--allow-expired" in cp.stderr
    assert run_cli(*args, "--allow-expired", env=ENV).returncode == 0
    # wrong certificate usage: a "guardian" whose encryption certificate is a signing certificate
    bad = Guardian("Bad", world["a"].signing_certificate, world["a"].signing_certificate, source="generated")
    save_guardian(bad, tmp_path / "bad", None)
    cp = run_cli("pdk", "new", "-o", str(tmp_path / "w.pdk"), *common, "--guardian", str(tmp_path / "bad"),
                 "--policy", "shielded", env=ENV)
    assert_clean_error(cp, 6)
    assert "usage" in cp.stderr
    # malformed answer file XML, malformed PDK, not a PDK
    (tmp_path / "broken.xml").write_bytes(b"<unattend><x></unattend>")
    assert_clean_error(run_cli("pdk", "new", "-o", str(tmp_path / "m.pdk"), "--owner", str(d / "owner"),
                               "--answer-file", str(tmp_path / "broken.xml"), "--policy", "shielded",
                               "--password-env", "TPW", env=ENV), 3)
    (tmp_path / "junk.pdk").write_bytes(b"\x30\x82\x01\x00junk")
    assert_clean_error(run_cli("pdk", "show", str(tmp_path / "junk.pdk")), 3)
    assert_clean_error(run_cli("pdk", "show", str(d / "t-1.2.vsc")), 3)
    assert_clean_error(run_cli("pdk", "show", str(tmp_path / "missing.pdk")), 9)
    # wrong owner password
    assert_clean_error(run_cli("pdk", "new", "-o", str(tmp_path / "p.pdk"), "--owner", str(d / "owner"),
                               "--policy", "shielded", "--password-env", "TPW", env={"TPW": "wrong"}), 5)
    # bad spec value
    assert_clean_error(run_cli("pdk", "new", "-o", str(tmp_path / "p.pdk"), "--owner", str(d / "owner"),
                               "--spec-value", "ComputerName=x", "--policy", "shielded", "--password-env", "TPW",
                               env=ENV), 2)


def test_library_limits():
    with pytest.raises(UsageError, match="384 KB"):
        SecretPart(other_files=[NamedFile("a", b"\0" * (384 * 1024 + 1))]).validate()
    SecretPart(other_files=[NamedFile("a", b"\0" * (384 * 1024))]).validate()


@pytest.mark.slow
def test_many_byte_flips_all_detected(world):
    """Extended: 3000 random flips of a PDK; each is refused with a typed error."""
    rng = random.Random(0xfeed)
    der = world["pdk"]
    for _ in range(3000):
        bad = bytearray(der)
        pos = rng.randrange(len(bad))
        bad[pos] ^= rng.randrange(1, 256)
        with pytest.raises(TemplateToolError):
            read_pdk(bytes(bad))
