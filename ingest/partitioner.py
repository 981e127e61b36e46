"""Key -> partition, as Kafka's Java client computes it (murmur2), in under half aiokafka's time.

Every producer of ours must agree with every other producer of the same topic: the processor's
forget control records must land on the partition that holds the visitor's events (its Faust
tables are co-partitioned with the raw topic). aiokafka's pure-Python murmur2 reads one byte at
a time and was ~5% of the gateway's CPU per request; this one reads 32-bit words with `struct`.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

SEED = 0x9747B28C
M = 0x5BD1E995
MASK = 0xFFFFFFFF
WORDS = [struct.Struct(f"<{n}I") for n in range(64)]  # keys up to 255 bytes: no per-call format


def murmur2(data: bytes) -> int:
    """MurmurHash2 (32-bit) of `data` with Kafka's seed: `Utils.murmur2` of the Java client."""
    m, mask = M, MASK  # locals: this loop runs per record on every producer
    length = len(data)
    h = SEED ^ length
    count = length >> 2
    words = WORDS[count] if count < len(WORDS) else struct.Struct(f"<{count}I")
    for k in words.unpack_from(data):
        k = (k * m) & mask
        k ^= k >> 24
        h = ((h * m) & mask) ^ ((k * m) & mask)
    tail = length & 3
    base = length - tail
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h = ((h ^ data[base]) * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    return h ^ (h >> 15)


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for `key` among `partitions`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def kafka_partitioner(
    key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]
) -> int:
    """aiokafka's `partitioner=` hook, making the choices of its default partitioner."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[partition_for(key, len(all_partitions))]
