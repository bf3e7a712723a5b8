"""The shape docs/ARCHITECTURE.md promises, checked on the source: imports that only point down the layers,
no import-time side effects, few parameters, and one channel for warning, note and error lines."""
import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "dcgan_dist"
# Bottom to top; a module may import its own package and anything in a lower layer.
LAYERS = [{"errors", "fsutil", "redact", "host"}, {"config", "nets", "ops"}, {"data", "dist"}, {"run"}, {"report"},
          {"eval"}, {"train"}]


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text())


def layer(name: str) -> int:
    return next(i for i, members in enumerate(LAYERS) if name in members)


def test_imports_point_down_the_layers():
    up = []
    for path, tree in modules():
        mine = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for node in ast.walk(tree):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] == "dcgan_dist" and len(parts) > 1 and parts[1] != mine and layer(parts[1]) >= layer(mine) \
                        and layer(mine) > 0:
                    up.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not up, up


def test_importing_the_package_changes_no_global_state():
    code = ("import os, pkgutil, importlib, warnings, dcgan_dist, accelerate, numpy, PIL.Image, safetensors.torch, tqdm, "
            "yaml, torch.utils.data; before = (list(warnings.filters), dict(os.environ)); "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(dcgan_dist.__path__, 'dcgan_dist.') "
            "if not m.name.endswith('__main__')]; "
            "assert (list(warnings.filters), dict(os.environ)) == before")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def test_no_function_takes_more_than_five_parameters():
    # Signatures that a library dictates: urllib's redirect hook, an autograd Function's forward.
    dictated = {"redirect_request", "forward"}
    wide = []
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name not in dictated:
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                if len(names) + bool(a.vararg) + bool(a.kwarg) > 5:
                    wide.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({', '.join(names)})")
    assert not wide, wide


def test_warning_note_and_error_lines_have_one_channel():
    printed = []
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "print" and node.args:
                text = ast.unparse(node.args[0])
                if any(text.lstrip("f'\"").startswith(k) for k in ("warning:", "note:", "error:")):
                    printed.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not printed, f"print a warning, note or error through dcgan_dist.errors instead: {printed}"
