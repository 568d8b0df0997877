"""Process settings: the allocator tuning applies on glibc and can be turned off."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from mtpeft.runtime import ALLOCATOR_ENV, tune_allocator


def test_allocator_setting_can_be_left_alone(monkeypatch):
    monkeypatch.setenv(ALLOCATOR_ENV, "default")
    assert tune_allocator.__wrapped__() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not ctypes.util.find_library("c"),
                    reason="mallopt settings exist only in glibc")
def test_allocator_is_tuned_on_glibc(monkeypatch):
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    assert tune_allocator.__wrapped__() is True
