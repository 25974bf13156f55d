"""The decoded-image cache (``pyramidkd.engine.cached_tensors``): a second load reads
the file instead of decoding; a touched or changed source is decoded again; a
truncated, bit-flipped or foreign cache file is rebuilt with one log line, never
trusted; two loaders at once (threads, processes) decode once and both get the data."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyramidkd.engine import DatasetContext, cached_tensors, decode_images
from pyramidkd.engine.data import decoded_cache as decoded_module
from pyramidkd.plugins.datasets import imagefolder as imagefolder_module
from pyramidkd.plugins.datasets import vision
from pyramidkd.plugins.datasets.imagefolder import ImageFolder, ImageFolderParams
from pyramidkd.plugins.datasets.vision import Cifar10, TorchvisionParams
from test_datasets import write_cifar10, write_tree

@pytest.fixture
def context(tmp_path):
    return DatasetContext(seed=0, recipe_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def messages():
    """The ``pyramidkd`` logger's messages (the CLI stops it propagating to the root)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("pyramidkd")
    handler, level = Collect(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def decode_count(monkeypatch):
    """Counts images decoded by the imagefolder plugin."""
    calls = []
    real = imagefolder_module.load_image

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(imagefolder_module, "load_image", counting)
    return calls


def tree_params(**extra) -> ImageFolderParams:
    return ImageFolderParams(**{"root": "tree", "image_size": 12, "val_fraction": 1 / 3, **extra})


def all_images(data) -> torch.Tensor:
    return torch.cat([data.train.images, data.val.images, data.test.images])


def cache_files(context) -> list[Path]:
    return sorted(Path(context.cache_dir, "decoded").glob("*.tensors"))


def test_second_load_reads_the_cache(tmp_path, context, decode_count, messages):
    write_tree(tmp_path / "tree")
    first = ImageFolder(tree_params()).load_tensors(context)
    assert len(decode_count) == 27  # 18 training + 9 test images, each decoded once
    assert any(m.startswith("decoded imagefolder-12px in ") for m in messages)
    [file] = cache_files(context)
    assert file.name.startswith("imagefolder-12px-")
    decode_count.clear()
    second = ImageFolder(tree_params()).load_tensors(context)
    assert decode_count == []
    assert torch.equal(all_images(first), all_images(second)) and torch.equal(first.val.labels, second.val.labels)
    assert any(m.startswith("read decoded imagefolder-12px from the cache") for m in messages)
    # another split of the same pool reuses the entry; another selection is another entry
    assert len(ImageFolder(tree_params(split_seed=0, val_fraction=0.5)).load_tensors(context).val) == 9 and decode_count == []
    ImageFolder(tree_params(limit=9)).load_tensors(context)
    assert len(decode_count) == 9 + 9 and len(cache_files(context)) == 2


def test_touched_or_changed_source_is_decoded_again(tmp_path, context, decode_count, messages):
    write_tree(tmp_path / "tree")
    before = ImageFolder(tree_params(flip=False)).load_tensors(context)
    source = tmp_path / "tree" / "test" / "bee" / "0000.png"
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: same bytes, new mtime
    decode_count.clear()
    again = ImageFolder(tree_params(flip=False)).load_tensors(context)
    assert len(decode_count) == 27 and torch.equal(all_images(before), all_images(again))
    assert any("source files changed since it was written" in m for m in messages)
    Image.fromarray(np.full((12, 12, 3), 200, np.uint8)).save(source)  # changed content
    decode_count.clear()
    changed = ImageFolder(tree_params(flip=False)).load_tensors(context)
    assert len(decode_count) == 27
    position = [i for i, label in enumerate(changed.test.labels.tolist()) if label == 1][0]  # bee's first test image
    assert changed.test.images[position].eq(200).all() and not before.test.images[position].eq(200).all()
    assert len(cache_files(context)) == 1  # rewritten in place, not piled up


@pytest.mark.parametrize("damage", ["truncate", "flip-payload-bit", "flip-header-bit", "flip-header-length", "foreign", "empty"])
def test_damaged_cache_file_is_rebuilt_with_one_log_line(tmp_path, context, decode_count, messages, damage):
    write_tree(tmp_path / "tree")
    expected = all_images(ImageFolder(tree_params()).load_tensors(context))
    [file] = cache_files(context)
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip-payload-bit":
        data[-50] ^= 0x10
    elif damage == "flip-header-bit":
        data[decoded_module.PREFIX + 10] ^= 0x01
    elif damage == "flip-header-length":
        data[len(decoded_module.FORMAT_TAG) + 7] ^= 0x40
    elif damage == "foreign":
        data = bytearray(b"PK\x03\x04 not a cache file" * 10)
    else:
        data = bytearray()
    file.write_bytes(bytes(data))
    decode_count.clear()
    messages.clear()
    rebuilt = ImageFolder(tree_params()).load_tensors(context)
    assert len(decode_count) == 27 and torch.equal(all_images(rebuilt), expected)
    corrupt = [m for m in messages if "corrupt" in m]
    assert len(corrupt) == 1 and str(file) in corrupt[0] and "decoding imagefolder-12px again" in corrupt[0]
    decode_count.clear()
    assert torch.equal(all_images(ImageFolder(tree_params()).load_tensors(context)), expected) and decode_count == []  # the rebuilt file is good


def test_cifar_resize_cache_follows_the_batch_files(tmp_path, context, monkeypatch):
    write_cifar10(tmp_path / "data")
    params = TorchvisionParams(root="data", verify_checksums=False, image_size=36, val_fraction=0.2)
    calls = []
    real = vision.pil_decoder

    def counting(*args):
        decode = real(*args)
        return lambda item: (calls.append(item), decode(item))[1]

    monkeypatch.setattr(vision, "pil_decoder", counting)
    first = Cifar10(params).load_tensors(context)
    assert len(calls) == 70
    Cifar10(params).load_tensors(context)
    assert len(calls) == 70  # read from the cache
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2"
    os.utime(batch, ns=(batch.stat().st_atime_ns, batch.stat().st_mtime_ns + 10**9))
    again = Cifar10(params).load_tensors(context)
    assert len(calls) == 140 and torch.equal(first.test.images, again.test.images)


def test_roundtrip_of_every_dtype_and_empty_tensors(tmp_path):
    tensors = {"u8": torch.arange(300, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 10, 10), "i64": torch.tensor([-1, 2**40]),
               "f64": torch.tensor([[0.1, 1e300]], dtype=torch.float64), "f32": torch.randn(5, 3), "bool": torch.tensor([True, False, True]),
               "empty": torch.empty(0, 3, dtype=torch.float32), "scalar": torch.tensor(2.5, dtype=torch.float64),
               "strided": torch.arange(12).view(3, 4).t()}
    calls = []
    first = cached_tensors(str(tmp_path), "mixed", {"k": 1}, [], lambda: (calls.append(1), tensors)[1])
    second = cached_tensors(str(tmp_path), "mixed", {"k": 1}, [], lambda: (calls.append(1), tensors)[1])
    assert len(calls) == 1
    for name, tensor in tensors.items():
        assert second[name].dtype == tensor.dtype and second[name].shape == tensor.shape and torch.equal(second[name], tensor), name
        assert torch.equal(first[name], tensor)
    second["u8"][0, 0, 0] = 7  # the tensors read back are ordinary, writable tensors
    other_key = cached_tensors(str(tmp_path), "mixed", {"k": 2}, [], lambda: (calls.append(1), {"x": torch.zeros(1)})[1])
    assert len(calls) == 2 and torch.equal(other_key["x"], torch.zeros(1))
    with pytest.raises(TypeError, match="JSON"):
        cached_tensors(str(tmp_path), "mixed", {"k": object()}, [], dict)


def test_leftover_temporary_file_of_a_killed_writer_is_removed(tmp_path):
    path = Path(decoded_module.cache_file(str(tmp_path), "data", {"k": 1}))
    path.parent.mkdir(parents=True)
    leftover = path.parent / f".{path.name}.abc123.tmp"
    leftover.write_bytes(b"half a file")
    cached_tensors(str(tmp_path), "data", {"k": 1}, [], lambda: {"x": torch.ones(2)})
    assert not leftover.exists() and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.name + ".lock"])


def test_unusable_cache_folder_decodes_without_caching(tmp_path, messages):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    result = cached_tensors(str(blocker), "data", {"k": 1}, [], lambda: {"x": torch.ones(2)})
    assert torch.equal(result["x"], torch.ones(2))
    assert any("cannot use the cache folder" in m and "without caching" in m for m in messages)


def test_two_threads_at_once_decode_once(tmp_path):
    started, calls, results = threading.Barrier(2), [], {}
    payload = {"images": torch.arange(4000, dtype=torch.int64).remainder(251).to(torch.uint8).view(10, 4, 10, 10)}

    def decode():
        calls.append(threading.get_ident())
        threading.Event().wait(0.2)  # hold the lock a while so the other thread has to wait for it
        return payload

    def loader(name):
        started.wait()
        results[name] = cached_tensors(str(tmp_path), "shared", {"k": 1}, [], decode)

    threads = [threading.Thread(target=loader, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert torch.equal(results["a"]["images"], payload["images"]) and torch.equal(results["b"]["images"], payload["images"])


WORKER = textwrap.dedent("""
    import hashlib, sys, time
    import torch
    from pyramidkd.engine import cached_tensors

    cache, log, source = sys.argv[1:4]

    def decode():
        with open(log, "a") as handle:
            handle.write("decode\\n")
        time.sleep(0.5)  # overlap with the other process
        return {"images": torch.arange(30000, dtype=torch.int64).remainder(253).to(torch.uint8).view(30, 1000)}

    tensors = cached_tensors(cache, "shared", {"k": 1}, [source], decode)
    print(hashlib.sha256(tensors["images"].numpy().tobytes()).hexdigest())
""")


def test_two_processes_at_once_decode_once(tmp_path):
    source, log = tmp_path / "source.bin", tmp_path / "decodes.log"
    source.write_bytes(b"pretend images")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    processes = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(log), str(source)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err for _, err in outputs]
    expected = hashlib.sha256(torch.arange(30000, dtype=torch.int64).remainder(253).to(torch.uint8).numpy().tobytes()).hexdigest()
    assert [out.strip() for out, _ in outputs] == [expected, expected]
    assert log.read_text().count("decode") == 1


def test_decode_images_keeps_order_and_names_bad_shapes():
    items = list(range(37))
    images = decode_images(items, lambda i: np.full((2, 3, 1), i, np.uint8), (1, 2, 3), threads=3, chunk=5)
    assert images.shape == (37, 1, 2, 3) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == items
    with pytest.raises(ValueError, match=r"item 4 decoded to uint8 \(3, 3, 1\)"):
        decode_images(items, lambda i: np.zeros((3 if i == 4 else 2, 3, 1), np.uint8), (1, 2, 3), threads=2, chunk=5)


def test_unreadable_image_is_a_dataset_error_naming_it(tmp_path, context):
    from pyramidkd.engine import DatasetError

    write_tree(tmp_path / "tree")
    bad = tmp_path / "tree" / "train" / "bee" / "0003.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        ImageFolder(tree_params()).load_tensors(context)
    assert cache_files(context) == []
