"""Byte units, said once for every layer (no imports: the codecs use them)."""

KiB = 1024
MiB = 1024 * KiB
