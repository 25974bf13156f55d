"""The decoded-image cache: images decoded once into a file under the cache folder.

Decoding tens of thousands of JPEGs (or resizing every image) costs more than an
epoch of a small student, so a data set decodes once and later runs read the
result. Any data set plugin can use it::

    from pyramidkd.engine import cached_tensors, decode_images

    tensors = cached_tensors(context.cache_dir, "mydata", key={"root": root, "image_size": 64},
                             sources=paths, decode=lambda: {"images": decode_images(paths, read_one, (3, 64, 64))})

* **Key.** ``key`` (a JSON-able mapping: what was decoded and how: the folder, the
  image size, the selected indices, library versions) names the file,
  ``<cache>/decoded/<name>-<sha256(key)[:16]>.tensors``; the fingerprint of
  ``sources`` (path, size and mtime_ns of every source file) is stored inside it. A
  changed, touched, added or removed source file is detected and decoded again,
  overwriting the entry, so a data set whose files change does not pile up files.
* **Format.** ``FORMAT_TAG`` line, an 8-byte little-endian header length, the
  sha256 of the header (32 bytes), a JSON header (key digest, tensor
  names/dtypes/shapes/offsets, payload size and the sha256 of the payload), then
  the tensors' bytes, each at a 64-byte-aligned offset. A file whose tag, header, size or checksum does not match is never
  trusted: it is rebuilt with one log line.
* **Atomic and concurrent.** Written to a temporary file in the same folder, fsynced
  and renamed into place; decoding and writing happen under an ``flock`` on
  ``<file>.lock``, so a second run (or thread) that starts at the same time waits and
  then reads the first one's file instead of decoding again.
* A cache folder that cannot be written is not an error: the run decodes and goes on
  without the cache (with a warning).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import struct
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import DatasetError
from ..formatting import format_bytes
from ..rundir import atomic_write

log = logging.getLogger("pyramidkd")

FORMAT_TAG = b"pyramidkd-decoded-tensors 1\n"
FOLDER = "decoded"
SUFFIX = ".tensors"
ALIGN = 64  # every tensor starts at a multiple of this many bytes (any dtype's alignment)
MAX_HEADER = 1 << 20
PREFIX = len(FORMAT_TAG) + 8 + 32  # tag, header length, header sha256
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                                                                 torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool)}


class CacheProblem(Exception):
    """Why a cache file cannot be used (``stale``: the sources changed; else corrupt)."""

    def __init__(self, reason: str, stale: bool = False):
        super().__init__(reason)
        self.stale = stale


# --- keys -----------------------------------------------------------------------


def key_digest(key: Mapping[str, Any]) -> str:
    try:
        text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    except TypeError as error:
        raise TypeError(f"cached_tensors: the key must be JSON-serialisable ({error})") from None
    return hashlib.sha256(text.encode()).hexdigest()


def sources_digest(sources: Iterable[str]) -> str:
    """sha256 over (path, size, mtime_ns) of every source file, in order."""
    digest = hashlib.sha256()
    for path in sources:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise DatasetError(f"cannot read {path}: {error.strerror or error}", fix="the data set's files changed while loading; check them and run again") from None
        absolute = path if os.path.isabs(path) else os.path.abspath(path)
        digest.update(f"{absolute}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_file(cache_dir: str, name: str, key: Mapping[str, Any]) -> str:
    """The file that holds the entry ``key`` of data set ``name``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "data"
    return os.path.join(cache_dir, FOLDER, f"{safe}-{key_digest(key)[:16]}{SUFFIX}")


# --- the file format ------------------------------------------------------------------


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _byte_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _layout(tensors: Mapping[str, torch.Tensor]) -> tuple[list[dict], list, int]:
    """(header entries, payload chunks in order, payload size): each tensor at an aligned offset."""
    entries, chunks, offset = [], [], 0
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or str(tensor.dtype).removeprefix("torch.") not in DTYPES:
            raise TypeError(f"cached_tensors: {name!r} must be a tensor of one of {sorted(DTYPES)}, got {type(tensor).__name__}")
        start = _aligned(offset)
        if start > offset:
            chunks.append(bytes(start - offset))
        data = tensor.detach().cpu().contiguous()
        view = _byte_view(data)
        chunks.append(view)
        entries.append({"name": name, "dtype": str(data.dtype).removeprefix("torch."), "shape": list(data.shape), "offset": start, "nbytes": view.nbytes})
        offset = start + view.nbytes
    return entries, chunks, offset


def write_cache(path: str, full_digest: str, tensors: Mapping[str, torch.Tensor], description: Any = None) -> None:
    """Write ``tensors`` to ``path`` atomically (temporary file, fsync, rename)."""
    entries, chunks, payload_bytes = _layout(tensors)
    checksum = hashlib.sha256()
    for chunk in chunks:
        checksum.update(chunk)
    header = json.dumps({"key": full_digest, "tensors": entries, "payload_bytes": payload_bytes,
                         "payload_sha256": checksum.hexdigest(), "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "description": description}, default=str).encode()
    prefix_bytes = PREFIX + len(header)

    def write(handle) -> None:
        handle.write(FORMAT_TAG + struct.pack("<Q", len(header)) + hashlib.sha256(header).digest() + header + bytes(_aligned(prefix_bytes) - prefix_bytes))
        for chunk in chunks:
            handle.write(chunk)

    atomic_write(path, write)


def read_cache(path: str, full_digest: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path``; raises ``FileNotFoundError`` when absent and
    :class:`CacheProblem` when the file is stale, truncated or corrupt."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        start = handle.read(PREFIX)
        if len(start) < PREFIX or not start.startswith(FORMAT_TAG):
            raise CacheProblem("not a decoded-image cache file (wrong format tag)")
        (header_bytes,) = struct.unpack("<Q", start[len(FORMAT_TAG) : len(FORMAT_TAG) + 8])
        if header_bytes > min(MAX_HEADER, size):
            raise CacheProblem(f"header length {header_bytes} does not fit the file")
        raw_header = handle.read(header_bytes)
        if hashlib.sha256(raw_header).digest() != start[-32:]:
            raise CacheProblem("the header's sha256 does not match")
        try:
            header = json.loads(raw_header)
            entries, payload_bytes, checksum = header["tensors"], int(header["payload_bytes"]), header["payload_sha256"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise CacheProblem(f"unreadable header ({type(error).__name__})") from None
        if header.get("key") != full_digest:
            raise CacheProblem("the source files changed since it was written", stale=True)
        data_start = _aligned(PREFIX + header_bytes)
        if size != data_start + payload_bytes:
            raise CacheProblem(f"{size} bytes, the header promises {data_start + payload_bytes} (truncated or overwritten)")
        buffer = bytearray(payload_bytes)
        handle.seek(data_start)
        if handle.readinto(memoryview(buffer)) != payload_bytes:
            raise CacheProblem("truncated while reading")
    if hashlib.sha256(buffer).hexdigest() != checksum:
        raise CacheProblem("the payload's sha256 does not match the header's")
    tensors = {}
    try:
        for entry in entries:
            dtype, shape, offset, nbytes = DTYPES[entry["dtype"]], tuple(entry["shape"]), int(entry["offset"]), int(entry["nbytes"])
            count = int(np.prod(shape, dtype=np.int64))
            if offset % ALIGN or offset + nbytes > payload_bytes or count * torch.empty((), dtype=dtype).element_size() != nbytes:
                raise ValueError(f"entry {entry['name']!r} does not fit the payload")
            flat = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=offset) if nbytes else torch.empty(0, dtype=torch.uint8)
            tensors[entry["name"]] = flat.view(dtype).view(shape)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CacheProblem(f"inconsistent header: {error}") from None
    return tensors


# --- the cache ------------------------------------------------------------------


def _open_lock(path: str) -> int:
    """The descriptor of ``<path>.lock`` (an ``flock`` on it is released when the
    descriptor is closed or the holder dies)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)


def _remove_leftovers(path: str) -> None:
    """Temporary files of writers that died (safe: the lock holder is the only writer)."""
    for leftover in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), f".{glob.escape(os.path.basename(path))}.*.tmp")):
        with contextlib.suppress(OSError):
            os.unlink(leftover)


def _try_read(path: str, full_digest: str) -> tuple[dict[str, torch.Tensor] | None, CacheProblem | None]:
    try:
        return read_cache(path, full_digest), None
    except FileNotFoundError:
        return None, None
    except CacheProblem as problem:
        return None, problem
    except OSError as error:
        return None, CacheProblem(f"unreadable: {error.strerror or error}")


def _decode_checked(decode: Callable[[], Mapping[str, torch.Tensor]], name: str) -> dict[str, torch.Tensor]:
    started = time.perf_counter()
    tensors = dict(decode())
    seconds = time.perf_counter() - started
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    log.info("decoded %s in %.1fs (%s)", name, seconds, format_bytes(nbytes))
    return tensors


def cached_tensors(cache_dir: str, name: str, key: Mapping[str, Any], sources: Iterable[str],
                   decode: Callable[[], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``decode()``'s tensors (a name -> CPU tensor mapping), read from the cache when an
    entry for ``key`` built from the same ``sources`` exists, else decoded and stored.

    ``key`` is every parameter the decoded tensors depend on besides the source files
    (JSON-able); ``sources`` the files they are decoded from (their path, size and
    mtime_ns are compared). ``name`` labels the file and the log lines."""
    path = cache_file(cache_dir, name, key)
    full_digest = hashlib.sha256(f"{key_digest(key)}:{sources_digest(sources)}".encode()).hexdigest()
    started = time.perf_counter()
    tensors, _ = _try_read(path, full_digest)
    if tensors is not None:
        log.info("read decoded %s from the cache in %.2fs (%s)", name, time.perf_counter() - started, path)
        return tensors
    try:
        lock = _open_lock(path)
    except OSError as error:
        log.warning("cannot use the cache folder %s (%s): decoding %s without caching it", os.path.dirname(path), error.strerror or error, name)
        return _decode_checked(decode, name)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits here while the first decodes
        tensors, problem = _try_read(path, full_digest)  # another run may have written it while we waited
        if tensors is not None:
            log.info("read decoded %s from the cache, written by another run meanwhile (%s)", name, path)
            return tensors
        if problem is not None and problem.stale:
            log.info("%s: %s; decoding %s again", path, problem, name)
        elif problem is not None:
            log.warning("%s: the decoded-image cache file is corrupt (%s); decoding %s again", path, problem, name)
        _remove_leftovers(path)
        tensors = _decode_checked(decode, name)
        try:
            write_cache(path, full_digest, tensors, description={"name": name, "key": key})
        except OSError as error:
            log.warning("cannot write the decoded-image cache %s (%s); continuing without it", path, error.strerror or error)
        return tensors
    finally:
        os.close(lock)


# --- decoding in parallel ------------------------------------------------------------


def decode_threads() -> int:
    """Threads for decoding: the usable cores, at most 8 (Pillow releases the GIL while
    it decodes and resizes, so threads overlap the C work)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def decode_images(items: Sequence, decode_one: Callable[[Any], Any], shape: tuple[int, int, int], threads: int | None = None,
                  chunk: int = 256) -> torch.Tensor:
    """uint8 [N, C, H, W] of ``decode_one(item)`` for every item, in order, on a small
    thread pool. ``decode_one`` returns an [H, W, C] uint8 array or anything
    ``numpy.asarray`` turns into one (a PIL RGB image); ``shape`` is (C, H, W)."""
    count = len(items)
    out = np.empty((count, *shape), dtype=np.uint8)

    def work(start: int) -> None:
        for index in range(start, min(start + chunk, count)):
            pixels = np.asarray(decode_one(items[index]))
            if pixels.ndim == 2:
                pixels = pixels[:, :, None]
            if pixels.shape != (shape[1], shape[2], shape[0]) or pixels.dtype != np.uint8:
                raise ValueError(f"decode_images: item {index} decoded to {pixels.dtype} {pixels.shape}, expected uint8 {(shape[1], shape[2], shape[0])} (H, W, C)")
            out[index] = pixels.transpose(2, 0, 1)

    starts = range(0, count, chunk)
    workers = min(threads or decode_threads(), max(1, len(starts)))
    if workers == 1:
        for start in starts:
            work(start)
    else:
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="pyramidkd-decode") as pool:
            futures = [pool.submit(work, start) for start in starts]
            try:
                for future in futures:
                    future.result()  # the first failure (e.g. an unreadable image) propagates
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    return torch.from_numpy(out)
