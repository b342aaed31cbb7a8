"""How to read expert files at the disk's speed: O_DIRECT read bandwidth by request size, requests in flight and
whether a file's requests wait for the one before it to end, with and without each chunk's check (CRC-32, zlib),
and the checksum's own speed on this host's cores.

The SSD tier (`offload.expert_files`) reads a file in CHUNK-byte requests, READERS in flight, one file after
another, and checksums chunks on threads of their own. This probe asks what of that loses the disk's bandwidth:

    python scripts/probe_disk.py --dir .bench/probe_disk --gb 8 --out probe_disk.json

Writes `--gb` of Mixtral-expert-sized files (352 MB; `--file-mb`) under `--dir` (kept for a second run; deleted
with `--clean`), then reads them in a shuffled order once per configuration. Prints a table; JSON with `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import zlib
from concurrent import futures
from pathlib import Path

import numpy as np

from moejax.offload.expert_files import _open_direct, _read_fully, aligned_buffer, padded

GB, MB = 1e9, 2**20


def checksum_speeds(chunk: int) -> dict:
    """GB/s of zlib.crc32 over `chunk`-byte buffers on 1 and 4 threads (zlib releases the GIL)."""
    data = np.random.default_rng(0).integers(0, 255, chunk, dtype=np.uint8)
    out = {"zlib": zlib.ZLIB_RUNTIME_VERSION}
    for threads in (1, 4, 8):
        with futures.ThreadPoolExecutor(threads) as pool:
            start = time.perf_counter()
            list(pool.map(lambda _: zlib.crc32(data), range(8 * threads)))
            out[f"crc32_{threads}_threads_gb_s"] = 8 * threads * chunk / GB / (time.perf_counter() - start)
    return out


def write_files(root: Path, count: int, size: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    block = np.random.default_rng(1).integers(0, 255, 64 * MB, dtype=np.uint8).tobytes()
    paths = []
    for i in range(count):
        path = root / f"E{i:04d}.bin"
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:
                for start in range(0, size, len(block)):
                    f.write(block[: min(len(block), size - start)])
        paths.append(path)
    os.sync()
    return paths


def read_files(paths: list[Path], size: int, chunk: int, in_flight: int, overlap: bool, verify: str) -> float:
    """Reads every file into one of two aligned buffers -> GB/s. overlap False: a file's requests begin once the
    file before is read and checked (as the tier reads now); True: all files' requests queue on one pool, so the
    disk always has `in_flight` requests. verify: 'none', 'pool' (each chunk's CRC on a pool of its own, waited at
    the file's end) or 'reader' (the reading thread checks its chunk right after reading it)."""
    buffers = [memoryview(aligned_buffer(size)) for _ in range(2)]
    readers = futures.ThreadPoolExecutor(in_flight)
    checkers = futures.ThreadPoolExecutor(in_flight)

    def read_chunk(fd, view, offset):
        n = _read_fully(fd, view, offset)
        if verify == "reader":
            zlib.crc32(view[:n])
        return n

    def submit(i: int, fd: int) -> list:
        """One file's requests, queued now: [(its buffer, offset, future)]."""
        view = buffers[i % 2]
        return [(view, o, readers.submit(read_chunk, fd, view[o : o + chunk], o)) for o in range(0, size, chunk)]

    def finish(requests: list) -> None:
        """Waits for the requests, each chunk checked on the pool as it arrives with verify 'pool'."""
        sums = []
        for view, o, request in requests:
            n = request.result()
            if verify == "pool":
                sums.append(checkers.submit(zlib.crc32, view[o : o + n]))
        for crc in sums:
            crc.result()

    start = time.perf_counter()
    fds = [_open_direct(p) for p in paths]
    try:
        if overlap:
            finish([request for i, fd in enumerate(fds) for request in submit(i, fd)])
        else:
            for i, fd in enumerate(fds):
                finish(submit(i, fd))
    finally:
        for fd in fds:
            os.close(fd)
        readers.shutdown()
        checkers.shutdown()
    return len(paths) * size / GB / (time.perf_counter() - start)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".bench/probe_disk")
    ap.add_argument("--gb", type=float, default=8.0, help="bytes of files written and read per configuration")
    ap.add_argument("--file-mb", type=float, default=336, help="one file's size (Mixtral-8x7B's expert: 336 MiB)")
    ap.add_argument("--clean", action="store_true", help="delete the files at the end")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    size = padded(int(args.file_mb * MB))
    count = max(2, int(args.gb * GB // size))
    result = {"checksum": checksum_speeds(16 * MB), "file_bytes": size, "files": count, "rows": []}
    print(json.dumps(result["checksum"]), flush=True)
    start = time.perf_counter()
    paths = write_files(Path(args.dir), count, size)
    print(f"wrote {count} files of {size / MB:.0f} MiB in {time.perf_counter() - start:.1f} s", flush=True)
    configs = [(16, 4, False, "none"), (16, 4, False, "pool"), (16, 4, True, "none"), (16, 8, False, "none"),
               (16, 8, True, "none"), (16, 16, True, "none"), (64, 4, False, "none"), (64, 8, True, "none"),
               (4, 16, True, "none"), (16, 8, True, "reader"), (16, 8, True, "pool"), (16, 16, True, "reader"),
               (16, 4, False, "none")]
    print(f"{'chunk MiB':>9} {'in flight':>9} {'files overlap':>13} {'check':>7} {'GB/s':>6}")
    for chunk_mb, in_flight, overlap, verify in configs:
        order = paths[:]
        random.Random(len(result["rows"])).shuffle(order)
        speed = read_files(order, size, chunk_mb * MB, in_flight, overlap, verify)
        row = dict(chunk_mb=chunk_mb, in_flight=in_flight, overlap=overlap, verify=verify, gb_s=speed)
        result["rows"].append(row)
        print(f"{chunk_mb:>9} {in_flight:>9} {str(overlap):>13} {verify:>7} {speed:>6.3f}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    if args.clean:
        for p in paths:
            p.unlink()


if __name__ == "__main__":
    main()
