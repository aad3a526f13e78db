"""Catalog: measurement, Merkle tree, document, signing, qualifier; judged by hashlib/openssl/ntfs-3g."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool

from templatetool.blockdev import RawFile
from templatetool.catalog.document import CatalogDocument, VolumeInfo, canonical_json, parse_version
from templatetool.catalog.measure import Measurer, measure_volume
from templatetool.catalog.merkle import level, root_from
from templatetool.catalog.ntfs import FreeMap, files_in_ranges, ntfs_free_map
from templatetool.catalog.qualifier import VolumeIdQualifier
from templatetool.catalog.vsc import open_vsc, sign_catalog
from templatetool.errors import FormatError, TemplateToolError, UsageError
from templatetool.signers import PfxSigner
from templatetool.signers.certs import new_key, self_signed, thumbprint, write_pfx


# -- helpers shared with test_protect.py ------------------------------------------------------------

def make_ntfs_volume(path: Path, size: int, files: dict[str, bytes], cluster: int = 4096) -> None:
    """An NTFS volume image made by mkntfs, files added with ntfscp (the ntfs-3g judges)."""
    require_tool("mkntfs", "ntfscp")
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkntfs", "-q", "-F", "-f", "-c", str(cluster), str(path)], check=True, capture_output=True)
    for name, data in files.items():
        src = path.parent / f".src-{os.getpid()}"
        src.write_bytes(data)
        cp = subprocess.run(["ntfscp", "-q", str(path), str(src), name], capture_output=True, text=True)
        src.unlink()
        assert cp.returncode == 0, cp.stderr


def make_pfx_signer(tmp: Path, kind: str = "ec-p256", subject: str = "CN=Template Signer") -> PfxSigner:
    k = new_key(kind)
    c = self_signed(subject, k)
    p = tmp / f"signer-{kind}.pfx"
    write_pfx(p, k, c, None)
    return PfxSigner(str(p))


def naive_root(leaves: list[bytes]) -> bytes:
    """An independent, recursive statement of the tree (docs/formats/vsc.md)."""
    if len(leaves) == 1:
        return leaves[0]
    nxt = []
    for i in range(0, len(leaves), 2):
        if i + 1 < len(leaves):
            nxt.append(hashlib.sha256(b"\x01" + leaves[i] + leaves[i + 1]).digest())
        else:
            nxt.append(leaves[i])
    return naive_root(nxt)


# -- Merkle + measurement -----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 100])
def test_merkle_matches_naive_and_levels_localise(n: int) -> None:
    leaves = [hashlib.sha256(bytes([i % 256]) * 7).digest() for i in range(n)]
    assert root_from(leaves) == naive_root(leaves)
    for k in range(0, 8):
        lv = level(leaves, k)
        assert root_from(lv) == naive_root(leaves)
        assert len(lv) == -(-n // (1 << k)) if n > 1 else 1


def test_measure_every_byte_matches_hashlib(tmp_path: Path) -> None:
    p = tmp_path / "v.img"
    data = os.urandom(5 * 65536 + 4096)  # short last block
    p.write_bytes(data)
    m = measure_volume(RawFile(p), 65536, free_space="none")
    want = [hashlib.sha256(b"\x00" + data[i:i + 65536]).digest() for i in range(0, len(data), 65536)]
    assert m.leaves == want and m.root == naive_root(want) and m.block_count == 6


def test_tap_any_chunking_equals_driver(tmp_path: Path) -> None:
    p = tmp_path / "v.img"
    data = os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(12345 * 512 // 512 * 512)
    p.write_bytes(data)
    ref = measure_volume(RawFile(p), 1 << 20, free_space="none")
    rng = np.random.default_rng(1)
    t = Measurer(len(data), 1 << 20, None, workers=2)
    pos = 0
    while pos < len(data):
        n = min(int(rng.integers(1, 3 << 20)), len(data) - pos)
        if data[pos:pos + n].count(0) == n:
            t.feed_zeros(pos, n)
        else:
            t.feed(pos, bytearray(data[pos:pos + n]))
        pos += n
    root, leaves = t.finish()
    assert root == ref.root and leaves == ref.leaves
    t2 = Measurer(len(data), 1 << 20)
    with pytest.raises(UsageError):
        t2.feed(512, b"x" * 512)
    t2.close()


def test_free_clusters_measure_as_zeros(tmp_path: Path) -> None:
    vol = tmp_path / "ntfs.img"
    make_ntfs_volume(vol, 48 << 20, {"a.bin": os.urandom(700_000), "b.txt": b"hello\n"})
    dev = RawFile(vol, writable=True)
    fm = ntfs_free_map(dev)
    assert fm.cluster_size == 4096 and 0 < fm.free_clusters < fm.cluster_count
    before = measure_volume(dev, 65536)
    # Scribble over free clusters: the measurement must not change, but an every-byte one does.
    free = np.flatnonzero(~fm.used)
    for c in free[:: max(1, len(free) // 50)]:
        dev.write(int(c) * 4096, os.urandom(4096))
    after = measure_volume(dev, 65536)
    assert after.root == before.root
    assert measure_volume(dev, 65536, free_space="none").root != before.root
    # Free blocks are never read: far fewer bytes read than the volume size.
    assert after.bytes_read < dev.size // 2
    dev.close()


def test_files_in_ranges_names_the_file(tmp_path: Path) -> None:
    vol = tmp_path / "ntfs.img"
    payload = os.urandom(1_500_000)
    make_ntfs_volume(vol, 32 << 20, {"payload.bin": payload, "other.txt": b"x" * 5000})
    raw = vol.read_bytes()
    off = raw.find(payload[:8192])
    assert off > 0
    hits = files_in_ranges(RawFile(vol), [(off + 700_000, 1)])
    assert [h["path"] for h in hits] == ["payload.bin"]


def test_free_map_partial_cluster_mask() -> None:
    fm = FreeMap(4096, np.array([True, False, True, False], dtype=bool))
    m = Measurer(4 * 4096, 8192, fm, workers=1)
    data = os.urandom(4 * 4096)
    m.feed(0, data)
    root, leaves = m.finish()
    masked = data[:4096] + bytes(4096) + data[8192:12288] + bytes(4096)
    assert leaves == [hashlib.sha256(b"\x00" + masked[:8192]).digest(), hashlib.sha256(b"\x00" + masked[8192:]).digest()]


# -- document, signing, qualifier ----------------------------------------------------------------------

def _doc(block_count: int = 10, max_nodes: int = 16384) -> CatalogDocument:
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(block_count)]
    vol = VolumeInfo(size=block_count * 65536, sector_size=512, filesystem="ntfs", cluster_size=4096,
                     partition_index=3, partition_offset=1 << 20, partition_guid="abbf3419-1b81-4327-8d1b-01eadde073ad",
                     partition_type="ebd0a0a2-b9e5-4433-87c0-68b6b72699c7")
    return CatalogDocument.build("WS2022-DC", "10.0.20348.1", vol, 65536, leaves, root_from(leaves),
                                 "ntfs-bitmap-zero", max_detail_nodes=max_nodes)


def test_document_canonical_roundtrip_and_strictness() -> None:
    d = _doc(100, max_nodes=16)
    assert d.detail_level == 3 and len(d.detail) == 13
    b = d.to_bytes()
    assert b == canonical_json(d.to_json())
    d2 = CatalogDocument.from_bytes(b)
    assert d2.to_bytes() == b and d2.version == (10, 0, 20348, 1) and d2.root == d.root
    with pytest.raises(FormatError):
        CatalogDocument.from_bytes(b.replace(b'{"created"', b'{ "created"'))  # not canonical
    with pytest.raises(FormatError):
        CatalogDocument.from_bytes(b[:-1] + b',"name":"x"}')  # duplicate key
    bad = d.to_json()
    bad["measurement"]["root"] = "00" * 32
    with pytest.raises(FormatError, match="root"):
        CatalogDocument.from_bytes(canonical_json(bad))


@pytest.mark.parametrize("v", ["1.2.3", "1.2.3.65536", "a.b.c.d", "1.2.3.4.5", ""])
def test_bad_versions(v: str) -> None:
    with pytest.raises(UsageError):
        parse_version(v)


def test_signed_catalog_openssl_and_tamper(tmp_path: Path) -> None:
    require_tool("openssl")
    s = make_pfx_signer(tmp_path)
    d = _doc(20)
    der = sign_catalog(d, s)
    (tmp_path / "c.vsc").write_bytes(der)
    (tmp_path / "ca.pem").write_bytes(s.certificate.public_bytes(__import__("cryptography.hazmat.primitives.serialization",
                                                                             fromlist=["Encoding"]).Encoding.PEM))
    cp = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(tmp_path / "c.vsc"),
                         "-purpose", "any", "-CAfile", str(tmp_path / "ca.pem"), "-out", str(tmp_path / "doc.json")],
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "doc.json").read_bytes() == d.to_bytes()
    info = open_vsc(der)
    assert info.name == "WS2022-DC" and info.signer_thumbprint == thumbprint(s.certificate)


def test_qualifier_semantics(tmp_path: Path) -> None:
    s = make_pfx_signer(tmp_path)
    other = make_pfx_signer(tmp_path, "ec-p384", "CN=Template Signer")  # same subject, other key
    info = open_vsc(sign_catalog(_doc(4), s))
    info_other = open_vsc(sign_catalog(_doc(4), other))
    ge = VolumeIdQualifier("WS2022-DC", thumbprint(s.certificate), parse_version("10.0.20348.0"), "ge")
    assert ge.matches(info)[0]
    assert not ge.matches(info_other)[0] and "signer" in ge.matches(info_other)[1]
    eq = VolumeIdQualifier.from_vsc(info, "eq")
    assert eq.matches(info)[0]
    gt = VolumeIdQualifier.from_vsc(info, "GreaterThan")
    ok, why = gt.matches(info)
    assert not ok and "greater than" in why
    # Name must match exactly before the version counts, even when the version would qualify.
    n = VolumeIdQualifier("ws2022-dc", thumbprint(s.certificate), (0, 0, 0, 0), "ge")
    assert not n.matches(info)[0] and "name" in n.matches(info)[1]
    assert VolumeIdQualifier.from_json(ge.to_json()) == ge
    with pytest.raises(UsageError):
        VolumeIdQualifier("x", "AA", (1, 0, 0, 0), "lt")


def test_measure_rejects_bad_block_size(tmp_path: Path) -> None:
    p = tmp_path / "v.img"
    p.write_bytes(bytes(8192))
    with pytest.raises(TemplateToolError):
        measure_volume(RawFile(p), 1000, free_space="none")


def test_generic_device_path_equals_raw_fast_path(tmp_path: Path) -> None:
    """measure_volume reads RawFile with reusable buffers; any other device goes through read()."""
    from templatetool.blockdev import BlockDevice

    class Wrapped(BlockDevice):
        def __init__(self, inner: RawFile) -> None:
            self.inner, self.size, self.name = inner, inner.size, "wrapped"

        def read(self, offset: int, length: int) -> bytes:
            return self.inner.read(offset, length)

    p = tmp_path / "v.img"
    p.write_bytes(os.urandom(9 * 65536 + 512))
    a = measure_volume(RawFile(p), 65536, free_space="none", read_size=3 * 65536)
    b = measure_volume(Wrapped(RawFile(p)), 65536, free_space="none", read_size=3 * 65536)
    assert a.root == b.root and a.leaves == b.leaves and a.block_count == 10


def test_documented_tree_vector() -> None:
    """docs/formats/vsc.md §4 test vector, recomputed with plain hashlib."""
    L = [hashlib.sha256(b"\x00" + x).digest() for x in (b"a", b"b", b"c")]
    want = hashlib.sha256(b"\x01" + hashlib.sha256(b"\x01" + L[0] + L[1]).digest() + L[2]).hexdigest()
    assert want == "36642e73c2540ab121e3a6bf9545b0a24982cd830eb13d3cd19de3ce6c021ec1"
    assert root_from(L).hex() == want
    doc = (Path(__file__).resolve().parents[1] / "docs" / "formats" / "vsc.md").read_text()
    assert want in doc


def test_unknown_measurement_field_refused() -> None:
    from templatetool.errors import UnsupportedError

    j = _doc(3).to_json()
    j["measurement"]["salt"] = "x"
    with pytest.raises(UnsupportedError):
        CatalogDocument.from_bytes(canonical_json(j))


def test_mutated_documents_fail_cleanly() -> None:
    """Random structural mutations of a valid document raise only typed errors (never a crash)."""
    import json
    import random

    rnd = random.Random(5)
    base = _doc(7).to_json()
    values = [None, 1, -1, 2**70, "x", [], {}, True, "ab" * 40, {"index": 1, "offset": 2}, 0, 65536]
    paths: list[list[str]] = []

    def walk(x: object, p: list[str]) -> None:
        if isinstance(x, dict):
            for k in x:
                paths.append(p + [k])
                walk(x[k], p + [k])

    walk(base, [])
    rejected = 0
    for _ in range(3000):
        m = json.loads(json.dumps(base))
        for _ in range(rnd.randint(1, 3)):
            p = rnd.choice(paths)
            t = m
            try:
                for k in p[:-1]:
                    t = t[k]
                if rnd.random() < 0.7:
                    t[p[-1]] = json.loads(json.dumps(rnd.choice(values)))
                else:
                    del t[p[-1]]
            except (KeyError, TypeError):
                pass
        try:
            CatalogDocument.from_bytes(canonical_json(m))
        except TemplateToolError:
            rejected += 1
    assert rejected > 2000


def test_large_volume_catalog_fits_a_vhdx_metadata_item(tmp_path: Path) -> None:
    """A 127 GiB volume (130 048 one-MiB blocks) stores level 3 and stays under 1 MiB signed."""
    leaves = [os.urandom(32) for _ in range(130048)]
    vol = VolumeInfo(size=130048 << 20, sector_size=512, filesystem="ntfs", cluster_size=4096)
    d = CatalogDocument.build("Big", "1.0.0.0", vol, 1 << 20, leaves, root_from(leaves), "ntfs-bitmap-zero")
    assert d.detail_level == 3 and len(d.detail) == 16256
    der = sign_catalog(d, make_pfx_signer(tmp_path, "rsa2048"))
    assert len(der) < (1 << 20)
    assert open_vsc(der).document.root == d.root


def test_free_blocks_agrees_with_block_all_free() -> None:
    """The vectorised per-block free mask equals the per-block answer (runs, map end, short last block)."""
    rng = np.random.default_rng(7)
    cs, bs = 4096, 64 * 1024
    flags = rng.random(3000) < 0.02
    flags[:40] = True  # a used run, then mostly free blocks
    for size in (3000 * cs, 3000 * cs + 512 * 3, 2990 * cs, 3013 * cs):
        m = Measurer(size, bs, FreeMap(cs, flags), workers=1)
        try:
            want = [m.block_all_free(i) for i in range(m.block_count)]
            assert m.free_blocks().tolist() == want
            assert any(want) and not all(want)
        finally:
            m.close()


def test_all_free_agrees_with_used_in() -> None:
    """FreeMap.all_free (byte tests, no arrays) gives the answer of used_in for every kind of span:
    inside one byte, across bytes, unaligned starts, partial last clusters, the map's end."""
    rng = np.random.default_rng(11)
    cs = 4096
    for density in (0.0, 0.003, 0.05):
        flags = rng.random(997) < density
        flags[500:540] = False
        fm = FreeMap(cs, flags)

        def reference(off: int, n: int) -> bool | None:
            used = fm.used_in(off, n)
            if used is None:
                return None
            return bool(off % cs == 0 and len(used) * cs >= n and not used.any())

        spans = [(o * cs, k * cs) for o in range(0, 997, 7) for k in (1, 2, 7, 8, 9, 16, 17, 63)]
        spans += [(500 * cs, 40 * cs), (500 * cs + 512, cs), (990 * cs, 7 * cs), (990 * cs, 8 * cs), (996 * cs, cs),
                  (997 * cs, cs), (1200 * cs, cs), (3 * cs, cs - 512), (3 * cs, 5 * cs + 512), (0, 0)]
        for off, n in spans:
            want = reference(off, n) if n else False
            assert fm.all_free(off, n) == want, (density, off // cs, n / cs)
