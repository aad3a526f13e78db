"""BitLocker FVE volume header + metadata block (parse_boot_sector, parse_metadata_block, open_fve)."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.bitlocker.metadata import parse_boot_sector, parse_metadata_block
    from templatetool.bitlocker.volume import open_fve


def target(data: bytes) -> None:
    if len(data) < 8:
        return
    kind, body = data[0] % 3, data[1:]
    if kind == 0:
        parse_boot_sector(body[:512].ljust(512, b"\0"), 8 << 20)
    elif kind == 1:
        m = parse_metadata_block(body[:65536], 0x10000, 8 << 20, 1)
        for e in m.entries:
            e.children()
    else:  # a whole tiny volume: header at 0, metadata copies wherever the header says
        fve = open_fve(common.MemDev(body, size=max(len(body), 1 << 20)))
        fve.info()


if __name__ == "__main__":
    common.main(target)
