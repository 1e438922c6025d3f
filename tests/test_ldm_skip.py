"""Without stable-diffusion-sdkit (the original `ldm` code), the tests that compare against it skip and say the
install line, instead of failing with ModuleNotFoundError (tests/conftest.py). Run in a child pytest with `ldm`
made unimportable."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import LDM_INSTALL

ROOT = Path(__file__).resolve().parents[1]
NEEDS_LDM = ["tests/test_parity.py::test_unet_matches_ldm", "tests/test_checkpoint.py::test_prediction_override"]
FAILS = "tests/test_ldm_skip.py::test_other_missing_modules_still_fail"


def child_pytest(*ids, env=None):
    code = ("import sys; sys.modules['ldm'] = None\n"   # `import ldm...` now raises ModuleNotFoundError
            f"import pytest; sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', *{list(ids)!r}]))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


def test_ldm_tests_skip_with_the_install_line():
    p = child_pytest(*NEEDS_LDM)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 skipped" in p.stdout and "failed" not in p.stdout and "error" not in p.stdout.lower(), p.stdout
    assert p.stdout.count(f"needs the original ldm code: {LDM_INSTALL}") >= 2, p.stdout


def test_other_missing_modules_still_fail():
    if not os.environ.get("MINISD_LDM_SKIP_CHILD"):
        p = child_pytest(FAILS, env=dict(os.environ, MINISD_LDM_SKIP_CHILD="1"))
        assert p.returncode == 1 and "1 failed" in p.stdout, p.stdout
        return
    import minisd_no_such_module  # noqa: F401  (the child run: a missing module that is not ldm is a failure)
