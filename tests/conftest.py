from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IMAGENETTE = SHARED_DATA / "imagenette"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def imagenette() -> Path:
    """The real imagenette tree beside the checkout (../shared/data/imagenette); skip when absent."""
    if not (IMAGENETTE / "val").is_dir():
        pytest.skip(f"real images not found at {IMAGENETTE}")
    return IMAGENETTE
