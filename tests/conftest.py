import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import build_model, save_checkpoint, tokenizer_for  # noqa: E402


class CheckpointFactory:
    """Builds each tiny (family, variant) once per session and saves it in the formats asked for."""

    def __init__(self, root: Path):
        self.root = root
        self.models: dict = {}
        self.paths: dict = {}

    def model(self, family: str, variant: str = "gqa", perturb_norms: bool = False):
        key = (family, variant, perturb_norms)
        if key not in self.models:
            model = build_model(family, variant, perturb_norms=perturb_norms)
            self.models[key] = (model, tokenizer_for(family))
        return self.models[key]

    def path(self, family: str, variant: str = "gqa", fmt: str = "hf_dir", perturb_norms: bool = False) -> Path:
        key = (family, variant, fmt, perturb_norms)
        if key not in self.paths:
            model, tok = self.model(family, variant, perturb_norms)
            out = self.root / f"{family}-{variant}-{fmt}{'-pn' if perturb_norms else ''}"
            out.mkdir(parents=True, exist_ok=True)
            self.paths[key] = save_checkpoint(model, tok, out, fmt)
        return self.paths[key]


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("ckpts"))


# The suite's numbers are CPU numbers (goldens, float32 references): `--device auto` would move them to a GPU
# where there is one. Tests of other devices pass `device` explicitly (tests/gpu).
os.environ.setdefault("HEADLENS_DEVICE", "cpu")
