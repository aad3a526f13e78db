"""HGS guardian metadata XML (import_metadata)."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.guardian.metadata import import_metadata


def target(data: bytes) -> None:
    import_metadata(data, "fuzz", allow_untrusted_root=True, allow_expired=True)


if __name__ == "__main__":
    common.main(target)
