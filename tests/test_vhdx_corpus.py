"""The malformed-VHDX corpus: every case gives a clean one-line CLI error, never a traceback,
never a partial output; the library raises typed errors and `check` reports findings."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli
from vhdx_corpus import build_corpus

from templatetool.errors import FormatError, TemplateToolError
from templatetool.vhdx import check, open_vhdx

#: What check must say about each case (a substring of its findings): the right reason, not just any.
REASONS = {
    "bad_signature": "no 'vhdxfile' signature", "empty_file": "no 'vhdxfile' signature",
    "truncated_header_section": "truncated", "truncated_metadata": "past the end of the file",
    "truncated_data": "past the end of the file", "garbage_after_signature": "no valid VHDX header",
    "both_headers_bad_crc": "CRC-32C mismatch", "header_version_2": "version 2",
    "headers_equal_seq_differ": "sequence number", "log_version_1": "log version 1",
    "log_misaligned": "not 1 MiB aligned", "non_empty_log": "unreplayed",
    "region_table_1_bad_crc": "region table 1: CRC-32C", "region_tables_both_bad_crc": "region table 2: CRC-32C",
    "region_table_bad_signature": "b'regx'", "region_tables_differ": "region tables differ",
    "overlapping_regions": "overlaps region metadata", "region_overlaps_log": "log (1048576..2097152) overlaps",
    "unknown_required_region": "unknown required region", "missing_bat_region": "lacks the BAT",
    "region_misaligned": "not 1 MiB aligned", "bat_entry_past_eof": "past the end of the file",
    "bat_partially_present_in_dynamic": "invalid payload state", "bat_state_4": "invalid payload state",
    "bat_blocks_overlap": "overlap each other", "bat_block_in_header_section": "inside the header section",
    "bat_block_over_metadata": "overlaps the region metadata", "metadata_bad_signature": "metadata table signature",
    "zero_length_item": "zero-length", "unknown_required_item": "unknown required metadata item",
    "user_item_required": "marked IsRequired", "overlapping_items": "overlap",
    "item_inside_table": "outside the item area", "item_past_region": "outside the item area",
    "missing_disk_size_item": "VirtualDiskSize is missing", "duplicate_item": "appears twice",
    "file_parameters_flags_3": "flags = 3", "bad_block_size": "invalid block size",
    "bad_logical_sector_size": "logical sector size 1024", "disk_size_not_sector_multiple": "virtual disk size",
    "has_parent_without_locator": "without a parent locator", "missing_parent": "parent disk not found",
    "moved_parent": "moved_from", "dwg_mismatch": "DataWriteGuid", "parent_cycle_self": "cycle",
    "parent_cycle_a": "cycle",
}

CASE_NAMES = [
    "bad_signature", "empty_file", "truncated_header_section", "truncated_metadata", "truncated_data",
    "garbage_after_signature", "both_headers_bad_crc", "header_version_2", "headers_equal_seq_differ",
    "log_version_1", "log_misaligned", "non_empty_log", "region_table_1_bad_crc", "region_tables_both_bad_crc",
    "region_table_bad_signature", "region_tables_differ", "overlapping_regions", "region_overlaps_log",
    "unknown_required_region", "missing_bat_region", "region_misaligned", "bat_entry_past_eof",
    "bat_partially_present_in_dynamic", "bat_state_4", "bat_blocks_overlap", "bat_block_in_header_section",
    "bat_block_over_metadata", "metadata_bad_signature", "zero_length_item", "unknown_required_item",
    "user_item_required", "overlapping_items", "item_inside_table", "item_past_region", "missing_disk_size_item",
    "duplicate_item", "file_parameters_flags_3", "bad_block_size", "bad_logical_sector_size",
    "disk_size_not_sector_multiple", "has_parent_without_locator", "missing_parent", "moved_parent",
    "dwg_mismatch", "parent_cycle_self", "parent_cycle_a",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    return build_corpus(tmp_path_factory.mktemp("vhdx-corpus"))


def test_corpus_is_complete(corpus) -> None:
    assert sorted(corpus) == sorted(CASE_NAMES) == sorted(REASONS)
    assert len(corpus) >= 20


def test_base_file_is_clean(corpus) -> None:
    base = next(iter(corpus.values())).path.parent / "_base.vhdx.src"
    assert check(base) == []
    cp = run_cli("vhdx", "check", str(base))
    assert cp.returncode == 0, cp.stderr


@pytest.mark.parametrize("name", CASE_NAMES)
def test_library_refuses(corpus, name: str) -> None:
    case = corpus[name]
    if name == "empty_file":  # not a disk at all: malformed input (exit 3) before any VHDX parsing
        with pytest.raises(FormatError, match="empty file is not a disk image"):
            check(case.path)
        return
    errors = [f for f in check(case.path) if f.severity == "error"]
    assert errors, f"check found nothing wrong with {name}"
    assert any(REASONS[name] in str(f) for f in errors), [str(f) for f in errors]
    if not case.convertible_as_raw and name != "empty_file":
        with pytest.raises(TemplateToolError):
            open_vhdx(case.path).close()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_cli_check_and_convert_fail_cleanly(corpus, name: str, tmp_path: Path) -> None:
    case = corpus[name]
    cp = run_cli("vhdx", "check", str(case.path))
    if name == "empty_file":
        assert_clean_error(cp, 3)  # malformed input, as inspect/decrypt/bitlocker info say too
        return
    assert_clean_error(cp, 4)
    assert "error:" in cp.stdout  # one line per finding
    if case.convertible_as_raw:
        return  # no VHDX signature: convert rightly treats it as a raw image
    out = tmp_path / "out.vhdx"
    cp = run_cli("vhdx", "convert", str(case.path), str(out))
    assert_clean_error(cp, case.convert_code)
    assert len([ln for ln in cp.stderr.splitlines() if ln.strip()]) == 1, cp.stderr
    assert list(tmp_path.iterdir()) == [], "a failed convert left output behind"
