"""Windows-made BitLocker volumes (dissect.fve test data) decrypt through our reader to the same
bytes pybde and dissect.fve give. The samples stay outside the repository (AGPL test data)."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest

from templatetool.bitlocker.volume import open_fve
from templatetool.blockdev import RawFile
from templatetool.errors import CredentialError

from .conftest import require_module, require_samples
from .test_bitlocker_common import pybde_sha256

RP = "284867-596541-514998-422114-660297-261613-215424-199408"
PW = "password12!@"
CASES = [
    ("recovery_password", "xts-aes-128", {"recovery_password": RP}),
    ("recovery_password", "xts-aes-128", {"password": PW}),
    ("startup_key", "xts-aes-128", {"bek": "startup_key.bek"}),
    ("recovery_key", "xts-aes-128", {"bek": "recovery_key.bek"}),
    ("suspended", "xts-aes-128", {"clear": True}),
    ("aes_128", "aes-128-cbc", {"password": PW}),
    ("aes_256", "aes-256-cbc", {"password": PW}),
    ("aes-xts_128", "xts-aes-128", {"password": PW}),
    ("aes-xts_256", "xts-aes-256", {"password": PW}),
    ("aes_128_diffuser", "aes-128-cbc-diffuser", {"password": PW}),
    ("aes_256_diffuser", "aes-256-cbc-diffuser", {"password": PW}),
]
IDS = [f"{n}-{next(iter(c))}" for n, _, c in CASES]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory):
    src = require_samples()
    d = tmp_path_factory.mktemp("bde-samples")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            if name.endswith(".bek"):
                cache[name] = src / name
            else:
                out = d / f"{name}.bin"
                with gzip.open(src / f"{name}.bin.gz", "rb") as fi, open(out, "wb") as fo:
                    shutil.copyfileobj(fi, fo, 1 << 20)
                cache[name] = out
        return cache[name]
    return get


def _unlock(img: Path, cred: dict, samples):
    kw = dict(cred)
    if "bek" in kw:
        kw["bek"] = samples(kw["bek"]).read_bytes()
    return open_fve(RawFile(img)).unlock(**kw)


def _ours_sha(dv, length: int) -> str:
    h = hashlib.sha256()
    for pos in range(0, length, 1 << 20):
        h.update(dv.read(pos, min(1 << 20, length - pos)))
    return h.hexdigest()


@pytest.mark.parametrize("name,method,cred", CASES, ids=IDS)
def test_sample_matches_pybde(samples, name: str, method: str, cred: dict) -> None:
    img = samples(name)
    size = img.stat().st_size
    dv = _unlock(img, cred, samples)
    assert dv.fve.info()["method"] == method
    ours = _ours_sha(dv, size)
    kw = {}
    if "recovery_password" in cred:
        kw["recovery_password"] = cred["recovery_password"]
    elif "password" in cred:
        kw["password"] = cred["password"]
    elif "bek" in cred:
        kw["bek_path"] = samples(cred["bek"])
    assert ours == pybde_sha256(img, size, **kw)
    # sanity: the plaintext is an NTFS volume
    assert dv.read(3, 8) == b"NTFS    "


@pytest.mark.parametrize("name,method,cred", CASES[:1] + CASES[4:6] + CASES[8:10], ids=IDS[:1] + IDS[4:6] + IDS[8:10])
def test_sample_matches_dissect(samples, name: str, method: str, cred: dict) -> None:
    """dissect.fve is slow (pure Python per sector): compare the first 4 MiB plus the FVE regions."""
    require_module("dissect.fve")
    from dissect.fve.bde import BDE

    img = samples(name)
    dv = _unlock(img, cred, samples)
    with open(img, "rb") as fh:
        b = BDE(fh)
        if "recovery_password" in cred:
            b.unlock_with_recovery_password(cred["recovery_password"])
        elif "password" in cred:
            b.unlock_with_passphrase(cred["password"])
        else:
            b.unlock_with_clear_key()
        s = b.open()
        m = dv.fve.metadata
        head = (1 << 20) if "diffuser" in name else (4 << 20)  # dissect's diffuser is ~1 MB/s
        spans = [(0, head), (m.vho_offset - 4096, 16384)] + [(o - 512, 65536 + 1024) for o in m.metadata_offsets]
        for off, n in spans:
            n = min(n, dv.size - off)
            s.seek(off)
            assert dv.read(off, n) == s.read(n), (name, off)


@pytest.mark.slow
@pytest.mark.parametrize("name,method,cred", CASES, ids=IDS)
def test_sample_matches_dissect_full(samples, name: str, method: str, cred: dict) -> None:
    from .test_bitlocker_common import dissect_sha256

    img = samples(name)
    size = img.stat().st_size
    kw = {"recovery_password": cred.get("recovery_password"), "password": cred.get("password"),
          "bek_path": samples(cred["bek"]) if "bek" in cred else None, "clear": cred.get("clear", False)}
    assert _ours_sha(_unlock(img, cred, samples), size) == dissect_sha256(img, size, **kw)


def test_sample_wrong_credentials(samples) -> None:
    f = open_fve(RawFile(samples("recovery_password")))
    with pytest.raises(CredentialError):
        f.unlock(password="password12!")
    with pytest.raises(CredentialError):
        f.unlock(bek=samples("startup_key.bek").read_bytes())
    info = f.info()
    assert [p["type"] for p in info["protectors"]] == ["recovery-password", "password"]
    assert info["description"].startswith("DESKTOP-QNI1MMF")
