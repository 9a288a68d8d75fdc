"""The farm's LoRAs: the library of LoRA files (library.py, pure Python: the client, the CLI and the
scheduler read it) and tiny stand-in LoRAs for the stand-in models (standins.py, imports torch when it
builds them)."""

from renderfarm.loras.library import (
    FAMILIES,
    LoraError,
    LoraInfo,
    LoraKeys,
    LoraLibrary,
    LoraProblem,
    UnknownLoraError,
    default_hash_cache,
    hash_file,
    inspect_keys,
    read_header,
)

__all__ = [
    "FAMILIES", "LoraError", "LoraInfo", "LoraKeys", "LoraLibrary", "LoraProblem", "UnknownLoraError",
    "default_hash_cache", "hash_file", "inspect_keys", "read_header",
]
