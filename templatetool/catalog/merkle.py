"""The catalog's Merkle tree (``templatetool-merkle-v1``), documented in docs/formats/vsc.md.

* leaf ``i`` = SHA-256(0x00 ‖ measured bytes of block ``i``) — the last block may be short;
* node = SHA-256(0x01 ‖ left ‖ right);
* each level pairs nodes (0,1), (2,3), …; an odd last node is carried up unchanged;
* the root is the single node of the top level (a one-block volume's root is its leaf).

Because odd nodes are carried up unchanged, node ``j`` of level ``k`` always covers blocks
``[j·2^k, (j+1)·2^k)`` (clipped to the block count), which is what lets a catalog store only
one level ("detail level") and still localise a change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
HASH_SIZE = 32


def leaf_hash(data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256(0x00 ‖ data). hashlib releases the GIL for large buffers (parallel-safe)."""
    h = hashlib.sha256(LEAF_PREFIX)
    h.update(data)
    return h.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def next_level(nodes: Sequence[bytes]) -> list[bytes]:
    """One level up: pair neighbours, carry an odd last node unchanged."""
    out = [node_hash(nodes[i], nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
    if len(nodes) % 2:
        out.append(nodes[-1])
    return out


def level(leaves: Sequence[bytes], k: int) -> list[bytes]:
    """The nodes of level ``k`` (level 0 = the leaves)."""
    nodes = list(leaves)
    for _ in range(k):
        if len(nodes) <= 1:
            break
        nodes = next_level(nodes)
    return nodes


def root_from(nodes: Sequence[bytes]) -> bytes:
    """The root over any complete level of the tree."""
    if not nodes:
        raise ValueError("empty tree")
    cur = list(nodes)
    while len(cur) > 1:
        cur = next_level(cur)
    return cur[0]


def detail_level_for(block_count: int, max_nodes: int) -> int:
    """The smallest level whose node count is ≤ ``max_nodes``."""
    k = 0
    n = block_count
    while n > max_nodes:
        n = (n + 1) // 2
        k += 1
    return k


def differing(a: Sequence[bytes], b: Sequence[bytes]) -> list[int]:
    """Indices where two equal-length node lists differ."""
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
