"""The firmware harness itself: a broken firmware test must show up red."""
import subprocess
import sys
import textwrap
from pathlib import Path

from fleet.mosquitto import Mosquitto
from tests.harness.mpvm import REPO, run_module


def test_broken_firmware_test_is_reported_with_micropython_traceback(tmp_path):
    fw = tmp_path / "tests" / "firmware"
    fw.mkdir(parents=True)
    mod = fw / "test_broken.py"
    mod.write_text(textwrap.dedent("""
        import sys
        def test_good():
            assert sys.implementation.name == "micropython"
        def test_bad():
            x = [1, 2]
            assert x == [1, 3], "deliberately broken"
        async def test_bad_async():
            raise ValueError("async breakage")
    """))
    results = run_module(mod, ["test_good", "test_bad", "test_bad_async"])
    assert results["test_good"][0] is True
    assert results["test_bad"][0] is False
    assert "AssertionError: deliberately broken" in results["test_bad"][1]
    assert 'File "fwtest_test_broken.py", line 7, in test_bad' in results["test_bad"][1].replace("/lib/", "")
    assert results["test_bad_async"][0] is False
    assert "ValueError: async breakage" in results["test_bad_async"][1]


def test_broken_firmware_test_fails_a_pytest_run(tmp_path):
    fw = tmp_path / "tests" / "firmware"
    fw.mkdir(parents=True)
    (fw / "test_red.py").write_text("def test_red():\n    assert 1 == 2, 'red'\n")
    (tmp_path / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                                          "pytest_plugins = ['tests.harness.mpvm']\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(fw)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 failed" in proc.stdout
    assert "MicroPython traceback" in proc.stdout and "AssertionError: red" in proc.stdout


def test_mosquitto_fixture_restarts_on_the_same_port(tmp_path):
    b = Mosquitto(tmp_path / "b").start()
    port = b.port
    b.restart()
    assert b.port == port and b.running
    b.stop()
    assert not b.running
