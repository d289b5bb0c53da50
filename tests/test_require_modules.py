"""The conftest plugin that turns a skip for a missing module into a failure (tests/require_modules.py)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from require_modules import ALLOW_ENV

HERE = Path(__file__).resolve().parent

TESTS = '''
import pytest

def test_missing_module():
    pytest.importorskip("circuitbench_no_such_module")

def test_module_too_old():
    pytest.importorskip("pytest", minversion="9999")

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_needs_cuda():
    pass

def test_skips_for_another_reason():
    pytest.skip("not on this platform")

def test_passes():
    pass
'''

MODULE_LEVEL = '''
import pytest

pytest.importorskip("circuitbench_no_such_module")

def test_never_collected():
    pass
'''


def run_pytest(folder: Path, test_file: str, allow: str | None, *more: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ALLOW_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    if allow is not None:
        env[ALLOW_ENV] = allow
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "require_modules",
                           "-p", "no:cacheprovider", "--rootdir", str(folder), test_file, *more],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def write(folder: Path, name: str, text: str) -> str:
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / name).write_text(textwrap.dedent(text))
    return name


def closing_line(result) -> str:
    return result.stdout.strip().splitlines()[-1]


def test_skip_for_a_missing_module_fails(tmp_path):
    name = write(tmp_path, "test_generated.py", TESTS)
    result = run_pytest(tmp_path, name, allow=None)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 failed, 1 passed, 2 skipped" in closing_line(result), result.stdout
    out = result.stdout
    assert "FAILED test_generated.py::test_missing_module" in out
    assert "FAILED test_generated.py::test_module_too_old" in out
    assert "could not import 'circuitbench_no_such_module'" in out and 'pip install -e ".[test]"' in out
    assert ALLOW_ENV in out
    # other skips stay skips
    assert "SKIPPED [1] test_generated.py" in out and "needs a CUDA device" in out and "not on this platform" in out


def test_the_env_var_allows_the_skip(tmp_path):
    name = write(tmp_path, "test_generated.py", TESTS)
    result = run_pytest(tmp_path, name, allow="1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 4 skipped" in closing_line(result), result.stdout
    assert run_pytest(tmp_path, name, allow="0").returncode == 1  # "0" does not allow


def test_module_level_importorskip_is_a_collection_error(tmp_path):
    name = write(tmp_path, "test_module_level.py", MODULE_LEVEL)
    other = write(tmp_path, "test_other.py", "def test_passes():\n    pass\n")
    result = run_pytest(tmp_path, name, None, other)
    assert result.returncode == 2, result.stdout + result.stderr  # interrupted by the collection error
    assert "ERROR test_module_level.py" in result.stdout
    assert "could not import 'circuitbench_no_such_module'" in result.stdout
    allowed = run_pytest(tmp_path, name, "1", other)
    assert allowed.returncode == 0 and "1 passed, 1 skipped" in closing_line(allowed), allowed.stdout
