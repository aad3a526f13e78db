"""Shielding data: read_pdk (signed CMS) and the secret part's JSON behind the envelope."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.pdk.document import SecretPart
    from templatetool.pdk.shielding import read_pdk


def target(data: bytes) -> None:
    if data[:1] == b"\x30":
        read_pdk(data)
    else:
        SecretPart.from_bytes(data[1:]).validate()


if __name__ == "__main__":
    common.main(target)
