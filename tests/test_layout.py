"""The models package is layered: ``model`` (the Model type) at the bottom, ``student`` and
``pipelines`` on it, ``loading`` on top; nothing below imports a module above it."""
import ast
from pathlib import Path

import flashdistill

MODELS = Path(flashdistill.__file__).parent / "models"
LAYER = {"denoiser": 0, "text": 0, "unet": 0, "discriminator": 0, "model": 1, "student": 2, "pipelines": 2, "loading": 3}


def _imports(name: str) -> set[str]:
    tree = ast.parse((MODELS / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        if isinstance(node, ast.ImportFrom) and node.level == 1 and not node.module:
            found |= {a.name for a in node.names}
    return found & set(LAYER)


def test_models_import_only_downwards():
    for name, layer in LAYER.items():
        up = {m for m in _imports(name) if LAYER[m] >= layer and m != name}
        assert not up, f"models/{name}.py imports {sorted(up)} from its own layer or above"


def test_loading_keeps_its_public_names():
    from flashdistill.models import loading

    for n in ("Model", "ModelNotFound", "read_meta", "load_model", "load_teacher", "load_student", "save_teacher"):
        assert hasattr(loading, n), n
