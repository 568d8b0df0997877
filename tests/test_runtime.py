"""Process settings: the allocator tuning applies on glibc and can be turned off; serving caps the kernel caches."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from mtpeft.runtime import ALLOCATOR_ENV, KERNEL_CACHE_ENV, bound_kernel_caches, tune_allocator


def test_allocator_setting_can_be_left_alone(monkeypatch):
    monkeypatch.setenv(ALLOCATOR_ENV, "default")
    assert tune_allocator.__wrapped__() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not ctypes.util.find_library("c"),
                    reason="mallopt settings exist only in glibc")
def test_allocator_is_tuned_on_glibc(monkeypatch):
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    assert tune_allocator.__wrapped__() is True


def test_kernel_caches_are_capped_unless_the_environment_says_otherwise(monkeypatch):
    for name in KERNEL_CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")  # the user's choice wins
    assert bound_kernel_caches(64) == {"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}
