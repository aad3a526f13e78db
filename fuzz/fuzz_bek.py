"""BitLocker startup key files (.BEK)."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.bitlocker.keys import parse_bek


def target(data: bytes) -> None:
    parse_bek(data)


if __name__ == "__main__":
    common.main(target)
