"""`templatetool luks encrypt | dump | decrypt` end to end (CLI in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .conftest import assert_clean_error, require_module, require_tool, run_cli

FAST = ("--pbkdf", "argon2id", "--pbkdf-memory", "8192", "--pbkdf-time", "1", "--pbkdf-parallel", "1")


def test_encrypt_dump_decrypt(tmp_path: Path) -> None:
    src = tmp_path / "root.img"
    src.write_bytes(os.urandom(1 << 20))
    out = tmp_path / "root.luks"
    env = {"LUKS_PW": "s3cret passphrase"}
    cp = run_cli("luks", "encrypt", str(src), "-o", str(out), "--passphrase-env", "LUKS_PW", *FAST, "--json",
                 env=env, check=True)
    res = json.loads(cp.stdout)["result"]
    assert res["sector_size"] == 4096 and res["data_offset"] == 16 << 20
    assert "s3cret" not in cp.stdout + cp.stderr
    d = json.loads(run_cli("luks", "dump", str(out), "--json", check=True).stdout)["result"]
    assert d["keyslots"]["0"]["kdf"] == {"type": "argon2id", "time": 1, "memory": 8192, "cpus": 1}
    assert d["segments"]["0"]["encryption"] == "aes-xts-plain64"
    back = tmp_path / "back.img"
    run_cli("luks", "decrypt", str(out), "-o", str(back), "--passphrase-env", "LUKS_PW", env=env, check=True)
    assert back.read_bytes() == src.read_bytes()
    # judged by cryptsetup too
    require_tool("cryptsetup")
    r = subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(out)],
                       input=b"s3cret passphrase", capture_output=True)
    assert r.returncode == 0, r.stderr


def test_clean_errors(tmp_path: Path) -> None:
    src = tmp_path / "root.img"
    src.write_bytes(os.urandom(64 << 10))
    out = tmp_path / "root.luks"
    env = {"LUKS_PW": "pw"}
    run_cli("luks", "encrypt", str(src), "-o", str(out), "--passphrase-env", "LUKS_PW", *FAST, env=env, check=True)
    cp = run_cli("luks", "decrypt", str(out), "-o", str(tmp_path / "x"), "--passphrase-env", "LUKS_PW",
                 env={"LUKS_PW": "wrong"})
    assert_clean_error(cp, 5)
    assert not (tmp_path / "x").exists()
    assert_clean_error(run_cli("luks", "dump", str(src)), 3)  # not LUKS
    assert_clean_error(run_cli("luks", "dump", str(tmp_path / "missing")), 9)
    assert_clean_error(run_cli("luks", "encrypt", str(tmp_path / "missing"), "-o", str(tmp_path / "y"),
                               "--passphrase-env", "LUKS_PW", env=env), 9)
    # the output exists: refused before any work (the output policy), input untouched
    before = src.read_bytes()
    assert_clean_error(run_cli("luks", "encrypt", str(src), "-o", str(out), "--passphrase-env", "LUKS_PW", env=env), 2)
    assert_clean_error(run_cli("luks", "encrypt", str(src), "-o", str(src), "--passphrase-env", "LUKS_PW",
                               "--overwrite", env=env), 2)
    assert src.read_bytes() == before
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    assert_clean_error(run_cli("luks", "encrypt", str(odd), "-o", str(tmp_path / "z"), "--passphrase-env",
                               "LUKS_PW", env=env), 2)
    assert_clean_error(run_cli("luks", "encrypt", str(src), "-o", str(tmp_path / "z"), "--passphrase-env",
                               "UNSET_VAR_X"), 5)


def test_tpm2_token_cli(tmp_path: Path) -> None:
    require_tool("swtpm")
    require_module("tpm2_pytss")
    from templatetool.tpm.swtpm import Swtpm

    src = tmp_path / "root.img"
    src.write_bytes(os.urandom(256 << 10))
    out = tmp_path / "root.luks"
    with Swtpm(tmp_path / "tpm") as tpm:
        run_cli("luks", "encrypt", str(src), "-o", str(out), "--passphrase-env", "LUKS_PW", *FAST,
                "--tpm2-device", tpm.tcti, "--tpm2-pcrs", "7", env={"LUKS_PW": "pw"}, check=True)
        d = json.loads(run_cli("luks", "dump", str(out), "--json", check=True).stdout)["result"]
        tok = d["tokens"]["0"]
        assert tok["type"] == "systemd-tpm2" and tok["keyslots"] == ["1"] and tok["tpm2-pcrs"] == [7]
        back = tmp_path / "back.img"
        run_cli("luks", "decrypt", str(out), "-o", str(back), "--tpm2-device", tpm.tcti, check=True)
        assert back.read_bytes() == src.read_bytes()
