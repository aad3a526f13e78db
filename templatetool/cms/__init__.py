"""CMS (RFC 5652): SignedData (signed.py) and AuthEnvelopedData (enveloped.py)."""
