"""Every random choice about a sample is a function of (seed, epoch, index): these make that key."""
from __future__ import annotations


def sample_seed(*keys: int) -> int:
    """A seed from several integers. torch's CPU generator (mt19937) keeps only 32 bits of a
    seed, so `seed << 32 | index` would ignore the seed: mix everything into 32 bits instead.
    (hash() of a tuple of ints is the same in every process; only str hashes are salted.)"""
    return hash(keys) & 0xFFFF_FFFF


def split_key(key) -> tuple[int, int]:
    """(epoch, index) from the training sampler's key, or a held-out loader's plain index."""
    return key if isinstance(key, tuple) else (0, key)
