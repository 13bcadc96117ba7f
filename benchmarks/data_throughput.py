"""Images/s of the shard stream for 256x256 shards: local disk, S3 (moto on loopback), raw decode.

    python benchmarks/data_throughput.py [--images 768] [--encoding png] [--rounds 9]

One run does everything on one core for the stream (DataLoader num_workers=0, one torch thread):
1. builds an LSUN-format LMDB of real photographs (scikit-learn's bundled samples, cropped and
   scaled to LSUN's 256 x 341, webp as LSUN ships them) and converts it in-process, which gives
   the preparation rate per core;
2. uploads the same shards to a moto S3 server started in its own process on 127.0.0.1;
3. times, in rounds that rotate the order, a raw PIL decode of the shard payloads held in
   memory, the loader reading local disk and the loader reading S3. The loader's output is
   what a training process receives: shuffled, flipped uint8 batches; the float scaling runs
   on the GPU there, and its CPU cost is printed separately for CPU-only runs. Each ratio is
   the median over rounds of the ratio within a round.
Goals (issue 3): S3/local >= 0.9 and stream/raw >= 0.85.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmray.data.config import PrepareConfig, StreamConfig
from cmray.data.prepare import prepare
from cmray.data.stream import ShardStream, to_unit_range


def lsun_like_lmdb(path: Path, n: int) -> None:
    """n 341 x 256 webp photos under hex keys, the layout of an official LSUN export."""
    import lmdb
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image(name) for name in ("china.jpg", "flower.jpg")]
    rng = np.random.default_rng(0)
    with lmdb.open(str(path), map_size=1 << 32) as env, env.begin(write=True) as txn:
        for i in range(n):
            arr = photos[i % 2]
            h = int(rng.integers(256, arr.shape[0]))
            top, left = rng.integers(0, arr.shape[0] - h + 1), rng.integers(0, arr.shape[1] - h)
            crop = Image.fromarray(arr[top : top + h, left : left + int(h * 4 / 3)])
            buf = io.BytesIO()
            crop.resize((341, 256), Image.Resampling.BICUBIC).save(buf, "WEBP", quality=75)
            txn.put(hashlib.sha1(str(i).encode()).hexdigest().encode(), buf.getvalue())


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def payloads(shard_dir: Path, ext: str) -> list[bytes]:
    out = []
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(f".{ext}")]
    return out


def raw_decode(data: list[bytes]) -> float:
    start = time.perf_counter()
    for payload in data:
        np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
    return len(data) / (time.perf_counter() - start)


def loader_rate(manifest: str, batch_size: int) -> float:
    """Images/s of one loader process's output: uint8 batches, flipped and shuffled."""
    cfg = StreamConfig(
        manifest=manifest, batch_size=batch_size, num_workers=0, resampled=False, shuffle_buffer=256
    )
    start, n = time.perf_counter(), 0
    for batch in ShardStream(cfg).dataset():
        n += len(batch.get("key", ()))
    return n / (time.perf_counter() - start)


def scale_rate(resolution: int, batch_size: int, repeats: int = 20) -> float:
    """Images/s of the uint8 -> [-1, 1] float pass, when it runs on the CPU (no GPU)."""
    x = torch.randint(0, 256, (batch_size, resolution, resolution, 3), dtype=torch.uint8)
    x = x.permute(0, 3, 1, 2)
    to_unit_range(x)
    start = time.perf_counter()
    for _ in range(repeats):
        to_unit_range(x)
    return repeats * batch_size / (time.perf_counter() - start)


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--encoding", default="png")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="cmray-bench-"))
    lsun_like_lmdb(work / "lmdb", args.images)
    cfg = PrepareConfig(
        source=f"lmdb:{work / 'lmdb'}",
        out=str(work / "shards"),
        resolution=256,
        encoding=args.encoding,
        shard_count=64,
        workers=-1,
    )
    start = time.perf_counter()
    manifest = prepare(cfg, log=lambda _: None)
    convert = manifest.count / (time.perf_counter() - start)
    data = payloads(work / "shards", manifest.extension)

    moto, endpoint = start_moto()
    try:
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(str(work / "shards") + "/", "bench/shards/", recursive=True)
        # Rounds rotate the order and each ratio is taken within a round: this machine's speed
        # drifts by tens of percent over minutes, far more than the effects being measured.
        timers = {
            "raw": lambda: raw_decode(data),
            "local": lambda: loader_rate(str(work / "shards"), args.batch_size),
            "s3": lambda: loader_rate("s3://bench/shards", args.batch_size),
        }
        rates: dict[str, list[float]] = {k: [] for k in timers}
        for r in range(args.rounds):
            for name in list(timers)[r % 3 :] + list(timers)[: r % 3]:
                rates[name].append(timers[name]())
        scale = scale_rate(256, args.batch_size)
    finally:
        moto.kill()
        shutil.rmtree(work, ignore_errors=True)
    s3_local = [s / loc for s, loc in zip(rates["s3"], rates["local"], strict=True)]
    stream_raw = [loc / raw for loc, raw in zip(rates["local"], rates["raw"], strict=True)]
    # With the float pass on the CPU too, per image times add: 1/local + 1/scale.
    cpu_float = [
        1 / (1 / loc + 1 / scale) / raw
        for loc, raw in zip(rates["local"], rates["raw"], strict=True)
    ]
    mean_kb = sum(map(len, data)) / len(data) / 1024
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, 1 thread; {manifest.count} images 256x256 "
        f"{args.encoding} ({mean_kb:.0f} KiB each) in {len(manifest.shards)} shards"
    )
    print(f"prepare (LSUN webp -> BOX resize, crop -> {args.encoding}): {convert:.1f} img/s/core")
    for name, values in rates.items():
        print(
            f"{name:>6}: median {median(values):7.1f} img/s   rounds "
            + " ".join(f"{v:.1f}" for v in values)
        )
    print(f"float scaling on the CPU (GPU runs do it on the GPU): {scale:.0f} img/s")
    print(
        f"S3/local   = {median(s3_local):.3f}  (goal >= 0.9; per round "
        + " ".join(f"{v:.2f}" for v in s3_local)
        + ")"
    )
    print(
        f"stream/raw = {median(stream_raw):.3f}  (goal >= 0.85; per round "
        + " ".join(f"{v:.2f}" for v in stream_raw)
        + ")"
    )
    print(f"stream/raw with the float pass on the CPU = {median(cpu_float):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
