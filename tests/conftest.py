"""Shared fixtures: small generated model families (cached per session)."""

import pytest

from mmerge.testing import write_model_family


@pytest.fixture(scope="session")
def family_files(tmp_path_factory):
    """base/ft1/ft2 as single float32 .safetensors files (exact comparisons)."""
    out = tmp_path_factory.mktemp("files")
    return write_model_family(
        out, hidden=16, intermediate=32, layers=3, vocab=48, dtype="F32", layout="file"
    )


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory):
    """base/ft1/ft2 as bf16 Hugging Face folders with config and tokenizer files."""
    out = tmp_path_factory.mktemp("folders")
    return write_model_family(
        out,
        hidden=16,
        intermediate=32,
        layers=3,
        vocab=48,
        dtype="BF16",
        layout="folder",
        shard_size=8000,
    )
