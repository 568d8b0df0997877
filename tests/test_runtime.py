"""Process settings: the allocator tuning applies on glibc and can be turned off; serving caps the kernel caches."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from mtpeft import runtime
from mtpeft.runtime import ALLOCATOR_ENV, GLIBC_MALLOC_ENV, KERNEL_CACHE_ENV, bound_kernel_caches, tune_allocator


def test_allocator_setting_can_be_left_alone(monkeypatch):
    monkeypatch.setenv(ALLOCATOR_ENV, "default")
    assert tune_allocator.__wrapped__() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not ctypes.util.find_library("c"),
                    reason="mallopt settings exist only in glibc")
def test_allocator_is_tuned_on_glibc(monkeypatch):
    for name in (ALLOCATOR_ENV, "GLIBC_TUNABLES", *GLIBC_MALLOC_ENV):
        monkeypatch.delenv(name, raising=False)
    assert tune_allocator.__wrapped__() is True


@pytest.mark.parametrize("name, value", [("MALLOC_TRIM_THRESHOLD_", "131072"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")])
def test_malloc_settings_the_user_made_through_glibc_stay(monkeypatch, name, value):
    # mallopt overrides glibc's environment settings: a user's trim threshold (memory handed
    # back in a container, say) was replaced by mtpeft's 1 GiB.
    for other in (ALLOCATOR_ENV, "GLIBC_TUNABLES", *GLIBC_MALLOC_ENV):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    calls = []

    class Mallopt:
        def __call__(self, *args):
            calls.append(args)
            return 1

    class Libc:
        mallopt = Mallopt()

    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(runtime.ctypes.util, "find_library", lambda name: "libc.so.6")
    assert tune_allocator.__wrapped__() is False and calls == []


def test_kernel_caches_are_capped_unless_the_environment_says_otherwise(monkeypatch):
    for name in KERNEL_CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")  # the user's choice wins
    assert bound_kernel_caches(64) == {"LRU_CACHE_CAPACITY": "64", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}
