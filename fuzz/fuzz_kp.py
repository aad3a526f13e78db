"""Key protectors ([MS-KPS] Protector XML): parse_kp and inspect_kp."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.kp.protector import inspect_kp, parse_kp


def target(data: bytes) -> None:
    parse_kp(data)
    inspect_kp(data)


if __name__ == "__main__":
    common.main(target)
