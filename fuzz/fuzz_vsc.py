"""Volume signature catalogs: the signed CMS (open_vsc) and the catalog document behind the signature."""
import atheris
import common

with atheris.instrument_imports(include=["templatetool"]):
    from templatetool.catalog.document import CatalogDocument
    from templatetool.catalog.vsc import open_vsc


def target(data: bytes) -> None:
    if data[:1] == b"\x30":
        open_vsc(data)
    else:  # the document parser is reached only behind a valid signature: fuzz it directly too
        CatalogDocument.from_bytes(data[1:])


if __name__ == "__main__":
    common.main(target)
