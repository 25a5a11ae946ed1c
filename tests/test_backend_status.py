"""Listing backends builds nothing: ``cpp`` on a fresh build folder is "buildable", and the compile waits for the
first call."""

from __future__ import annotations

import pytest

import m2d_kernels as m2d
from m2d_kernels.backends import cpp


@pytest.fixture
def fresh_build_folder(tmp_path, monkeypatch):
    """An empty build root and no outcome cached in this process; the cache is cleared again after, so later tests
    load the real extension from its own folder."""
    monkeypatch.setenv("M2D_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    cpp._extension.cache_clear()
    yield tmp_path / "build"
    cpp._extension.cache_clear()


def test_available_backends_does_not_compile(fresh_build_folder, monkeypatch):
    def refuse():
        raise AssertionError("available_backends() compiled the C++ extension")

    monkeypatch.setattr(cpp, "_compile", refuse)
    assert "cpp" in m2d.available_backends()
    status = m2d.backend_status()
    assert status["cpp"].startswith("buildable: compiled into ") and str(fresh_build_folder) in status["cpp"]
    assert status["torch"] == "ready" and status["reference"] == "ready"
    assert not fresh_build_folder.exists()  # nothing was even created


def test_without_a_compiler_cpp_is_not_listed(fresh_build_folder, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-m2d")
    assert "cpp" not in m2d.available_backends()
    assert m2d.backend_status()["cpp"] == "unavailable: no C++ compiler (no-such-compiler-m2d) on the PATH"


def test_after_a_call_the_status_is_the_outcome(fresh_build_folder, monkeypatch):
    monkeypatch.setattr(cpp, "_compile", lambda: (_ for _ in ()).throw(RuntimeError("g++: fatal error")))
    assert cpp.unavailable_reason("cpu") == "building the C++ extension failed: g++: fatal error"
    assert m2d.backend_status()["cpp"] == "unavailable: building the C++ extension failed: g++: fatal error"
    assert "cpp" not in m2d.available_backends()
