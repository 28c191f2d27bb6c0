"""The CLI's help must not wait for torch: importing the CLI path loads no heavy module.

Timing lives in benchmarks/cli_startup.py; these tests check the cause (what is
imported), which does not depend on the machine's speed.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "accelerate", "numpy", "matplotlib")


def _loaded_after(code: str) -> set:
    probe = code + f"\nimport sys, json; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("code", [
    "import compressor.cli",
    "import compressor.config",
    "import export, export.commands",
])
def test_cli_path_imports_no_heavy_module(code):
    assert _loaded_after(code) == set()


@pytest.mark.parametrize("argv", [["--help"], ["distill", "--help"], ["export", "--help"], ["bench", "--help"],
                                  ["eval", "--help"], ["train", "--help"]])
def test_help_runs_without_heavy_modules(argv):
    code = ("import sys\nfrom compressor.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n")
    assert _loaded_after(code) == set()


def test_export_names_load_on_first_use():
    import export

    assert "quantize_static_int8" in dir(export)
    from export.quantize import quantize_static_int8

    assert export.quantize_static_int8 is quantize_static_int8
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        export.not_a_name  # noqa: B018
