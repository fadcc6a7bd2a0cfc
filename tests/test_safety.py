"""Loading is safe: nothing a user supplies is unpickled, and no remote code runs. The package
source is scanned for the calls that would do either."""
import ast
import sys
from pathlib import Path

import flashdistill

SOURCE = Path(flashdistill.__file__).parent


def _calls():
    for path in sorted(SOURCE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            yield path, node


def test_no_pickle_and_no_unsafe_torch_load():
    bad = []
    for path, node in _calls():
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                bad.append(f"{path.name}:{node.lineno} imports a pickle module")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    bad.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
    assert not bad, bad


def test_no_trust_remote_code():
    bad = [f"{path.name}:{node.lineno}" for path, node in _calls()
           if isinstance(node, ast.keyword) and node.arg == "trust_remote_code"
           and not (isinstance(node.value, ast.Constant) and node.value.value is False)]
    assert not bad, bad


def test_the_scan_finds_what_it_looks_for(tmp_path, monkeypatch):
    """The scan is not vacuous: planted violations are reported."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "bad.py").write_text("import pickle\nimport torch\nx = torch.load('f')\n"
                                "m = f(trust_remote_code=True)\ny = torch.load('g', weights_only=True)\n")
    monkeypatch.setattr(sys.modules[__name__], "SOURCE", pkg)
    import pytest

    with pytest.raises(AssertionError, match="imports a pickle module.*torch.load without weights_only"):
        test_no_pickle_and_no_unsafe_torch_load()
    with pytest.raises(AssertionError, match="bad.py:4"):
        test_no_trust_remote_code()
