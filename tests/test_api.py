"""templatetool.api: the main jobs from Python with secrets as values and frozen, typed results."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from templatetool import api
from templatetool.errors import CredentialError, UsageError

from .conftest import GOLDEN, ROOT

PASSWORD = "s3cret-guardian-pw"


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("owner") / "owner"
    res = api.new_guardian("Owner", d, password=PASSWORD, key="ec-p256")
    assert res.encrypted and res.output == str(d) and res.name == "Owner"
    return d


def test_guardian_password_is_a_value(owner: Path) -> None:
    g = api.open_guardian(owner, private=True, password=PASSWORD)
    assert g.signing_key is not None and g.encryption_key is not None
    g2 = api.open_guardian(owner, private=True, password=lambda: PASSWORD.encode())  # a SecretSource
    assert g2.signing_certificate == g.signing_certificate


def test_encrypted_guardian_without_password_is_a_credential_error_not_a_prompt(owner: Path) -> None:
    """Regression: the library prompted (getpass) or read an env var; now it says what it needs."""
    from templatetool.guardian import load_guardian

    with pytest.raises(CredentialError) as ei:
        load_guardian(owner, private=True)
    assert ei.value.code == "guardian.password-needed"
    assert "--" not in str(ei.value)


def test_wrong_guardian_password_names_no_secret(owner: Path) -> None:
    with pytest.raises(CredentialError) as ei:
        api.open_guardian(owner, private=True, password="wrong-" + PASSWORD)
    assert PASSWORD not in str(ei.value) and "wrong-" not in str(ei.value)


def test_a_source_is_called_only_when_needed(tmp_path: Path) -> None:
    calls: list[int] = []
    api.new_guardian("Open", tmp_path / "g", password=None)
    api.open_guardian(tmp_path / "g", private=True, password=lambda: calls.append(1) or "x")
    assert calls == []  # unencrypted keys: the password was never asked for


def test_results_are_frozen_and_typed(tmp_path: Path) -> None:
    d = api.inspect(GOLDEN)
    assert d.format == "vhdx" and d.scheme == "gpt" and any(v.filesystem == "ntfs" for v in d.volumes)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.format = "raw"  # type: ignore[misc]
    with pytest.raises(TypeError):
        d.report["container"] = {}  # type: ignore[index]
    assert d.to_json()["container"]["format"] == "vhdx"


def test_encrypt_and_decrypt_with_values(tmp_path: Path) -> None:
    """BitLocker password and recovery password as values; the generated keys reach on_keys first."""
    seen: list[api.EncryptKeys] = []

    def on_keys(k: api.EncryptKeys) -> None:
        assert not (tmp_path / "enc.vhdx").exists()  # before the encrypted disk appears
        seen.append(k)

    enc = api.encrypt(GOLDEN, tmp_path / "enc.vhdx", recovery_password=True, password="bitlocker pw",
                      on_keys=on_keys)
    assert set(enc.protectors) == {"recovery-password", "password"}
    rp = enc.keys.recovery_password
    assert rp and seen and seen[0].recovery_password == rp
    assert rp not in repr(enc) and "bitlocker pw" not in repr(enc)
    a = api.decrypt(tmp_path / "enc.vhdx", tmp_path / "a.vhdx", recovery_password=rp)
    b = api.decrypt(tmp_path / "enc.vhdx", tmp_path / "b.vhdx", password=lambda: "bitlocker pw")
    assert a.method == b.method == enc.method

    def vol(p: Path) -> str:
        from templatetool.disk import open_disk, select_volume

        with open_disk(p) as dev:
            view, _ = select_volume(dev, None)
            return hashlib.sha256(view.read(0, view.size)).hexdigest()

    assert vol(tmp_path / "a.vhdx") == vol(tmp_path / "b.vhdx")
    with pytest.raises(CredentialError) as ei:
        api.decrypt(tmp_path / "enc.vhdx", tmp_path / "c.vhdx", password="not the password")
    assert "not the password" not in str(ei.value)
    with pytest.raises(UsageError) as ei2:
        api.decrypt(tmp_path / "enc.vhdx", tmp_path / "c.vhdx")
    assert ei2.value.code == "decrypt.credential" and "--" not in (ei2.value.hint or "")
    # the CLI still words it with its flags
    cp = subprocess.run([sys.executable, "-m", "templatetool.cli.main", "decrypt", str(tmp_path / "enc.vhdx"),
                         "-o", str(tmp_path / "d.vhdx")], cwd=ROOT, capture_output=True, text=True)
    assert cp.returncode == 2 and "--recovery-password-file" in cp.stderr


def test_no_protector_is_refused_in_library_terms(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as ei:
        api.encrypt(GOLDEN, tmp_path / "x.vhdx")
    assert ei.value.code == "encrypt.no-protector" and "--" not in str(ei.value)
    assert not (tmp_path / "x.vhdx").exists()


def test_coded_library_error_gets_the_cli_flag_wording(tmp_path: Path) -> None:
    """The library raises "allow overwriting it"; the CLI line still says --overwrite."""
    out = tmp_path / "exists.vhdx"
    out.write_bytes(b"x")
    with pytest.raises(UsageError) as ei:
        api.protect(GOLDEN, out, name="n", version="1.0.0.0", signer=None)  # type: ignore[arg-type]
    assert ei.value.code == "output.exists" and "--" not in str(ei.value)
    assert out.read_bytes() == b"x"


def test_new_pdk_with_an_owner_password_value(owner: Path, tmp_path: Path) -> None:
    from templatetool.pdk import NamedFile, read_pdk

    fabric = api.new_guardian("Fabric", tmp_path / "fabric", password=None)
    res = api.new_pdk(tmp_path / "t.pdk", owner=owner, owner_password=PASSWORD, guardians=[fabric.guardian],
                      policy="shielded", other_files={"a.txt": b"1"}, spec_values={"@ComputerName@": "vm01"},
                      allow_untrusted_root=True)
    assert (res.owner, res.guardians, res.policy) == ("Owner", ("Fabric",), "shielded")
    assert (tmp_path / "t.pdk").read_bytes() == res.der
    o = api.open_guardian(owner)
    info = read_pdk(res.der, "t.pdk", owner_certificate=o.signing_certificate)  # the owner's signature verifies
    assert info.owner.name == "Owner" and [g.name for g in info.guardians] == ["Fabric"]
    with pytest.raises(UsageError, match="two other files"):
        api.new_pdk(tmp_path / "u.pdk", owner=owner, owner_password=PASSWORD, policy="shielded",
                    other_files=[NamedFile("a.txt", b"1"), NamedFile("a.txt", b"2")])
    assert not (tmp_path / "u.pdk").exists()
