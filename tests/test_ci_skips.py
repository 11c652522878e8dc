"""The CI policy of tests/ci_skips.py, run on a throwaway suite in a pytest of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

SUITE = '''
import pytest

def test_passes():
    pass

def test_needs_a_layer():
    pytest.skip("no widget layer on this machine")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False
'''


def run_suite(tmp_path: Path, body: str, *, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_throwaway.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "-p", "tests.ci_skips",
         "test_throwaway.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_a_skip_fails_the_run_in_ci_and_names_the_test_and_reason(tmp_path: Path) -> None:
    done = run_suite(tmp_path, SUITE, ci="true")
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout
    assert "test_throwaway.py::test_needs_a_layer: no widget layer on this machine" in done.stdout
    assert "1 passed, 1 skipped, 1 xfailed" in done.stdout  # the xfail is no skip


def test_a_skip_stays_a_skip_with_its_reason_locally(tmp_path: Path) -> None:
    done = run_suite(tmp_path, SUITE, ci=None)
    assert done.returncode == pytest.ExitCode.OK, done.stdout
    assert "SKIPPED [1] test_throwaway.py:8: no widget layer on this machine" in done.stdout
    assert "skipped in CI" not in done.stdout


def test_a_module_skipped_at_collection_fails_the_run_in_ci(tmp_path: Path) -> None:
    body = 'import pytest\npytest.importorskip("rlmflow_no_such_service")\n\ndef test_x():\n    pass\n'
    done = run_suite(tmp_path, body, ci="1")
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout
    assert "could not import 'rlmflow_no_such_service'" in done.stdout


def test_a_run_without_skips_passes_in_ci(tmp_path: Path) -> None:
    done = run_suite(tmp_path, "def test_x():\n    pass\n", ci="true")
    assert done.returncode == pytest.ExitCode.OK, done.stdout


def test_a_failure_keeps_its_own_exit_status_in_ci(tmp_path: Path) -> None:
    done = run_suite(tmp_path, "def test_x():\n    assert False\n", ci="true")
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CI": "true"}, "True True None"),  # derandomized, the failing blob printed, no deadline
        ({"CI": "true", "HYPOTHESIS_PROFILE": "ci-random"}, "False True None"),  # a scheduled random run
        ({}, "False False 0:00:00.200000"),  # locally: hypothesis's own defaults
    ],
)
def test_hypothesis_runs_derandomized_and_prints_its_blob_in_ci(env: dict[str, str], expected: str) -> None:
    code = ("import tests.conftest\nfrom hypothesis import settings\n"
            "s = settings.default\nprint(s.derandomize, s.print_blob, s.deadline)")
    clean = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env}, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.strip() == expected
