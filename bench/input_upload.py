"""What an image input costs (issue 19): bytes held in Redis and in the blob store per input, and time per upload.

    python bench/input_upload.py [--json] [--size 1024] [--jobs 100] [--repeat 5]

An embedded redis-server and a blob directory in a temp dir; no Ray, no farm. For a `--size` px photo-like
image (smooth gradients plus noise: neither flat nor pure noise) sent as PNG and as JPEG (quality 90):
- check: check_image alone (decode, convert, encode the normalised PNG, hash), median of `--repeat`;
- upload: InputStore.put of a new image (check + blob write + Redis record), median of `--repeat`;
- again: the same image put again (checked and hashed, nothing written);
- Redis: MEMORY USAGE of the input's record; the blob store: the normalised PNG's size on disk;
- dedup: one FarmClient.submit_batch of `--jobs` jobs sharing the same image (bytes in each spec): how many
  blobs and records it left, and its time against the same batch without an image.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def photo(size: int, seed: int):
    """A photo-like RGB test image: gradients and shapes with a little noise."""
    from PIL import Image, ImageDraw, ImageFilter

    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i in range(12):
        x, y = (seed * 97 + i * 131) % size, (seed * 53 + i * 71) % size
        draw.ellipse((x, y, x + size // 4, y + size // 5), fill=((i * 40) % 256, (seed * 30) % 256, 200 - i * 10))
    image = image.filter(ImageFilter.GaussianBlur(3))
    noise = Image.effect_noise((size, size), 12).convert("RGB")
    return Image.blend(image, noise, 0.08)


def encoded(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(size: int, jobs: int, repeat: int) -> dict:
    from renderfarm.client import FarmClient
    from renderfarm.cluster.blobs import open_blob_store
    from renderfarm.cluster.keys import Keys
    from renderfarm.cluster.redis_server import EmbeddedRedis
    from renderfarm.cluster.store import Store
    from renderfarm.inputs import InputStore, check_image

    out: dict = {"size": size, "jobs": jobs, "formats": {}}
    with tempfile.TemporaryDirectory(prefix="rf-inputs-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis")
        url = server.start()
        try:
            client = FarmClient(url)
            store: Store = client.store
            blob_dir = Path(tmp) / "blobs"
            store.publish_settings({"input_store_url": blob_dir.as_uri()})
            inputs = InputStore(store, open_blob_store(blob_dir.as_uri()), ttl_s=3600)
            for fmt in ("PNG", "JPEG"):
                sources = [encoded(photo(size, seed), fmt) for seed in range(repeat + 1)]
                check_s = median_s(lambda: check_image(sources[0], "init_image"), repeat)
                fresh = iter(sources[1:])
                upload_s = median_s(lambda: inputs.put(next(fresh), "init_image"), repeat)
                again_s = median_s(lambda: inputs.put(sources[1], "init_image"), repeat)
                ref, valid = inputs.put(sources[0], "init_image")
                key = Keys().input(ref[7:])
                out["formats"][fmt] = {
                    "source_bytes": len(sources[0]), "stored_png_bytes": len(valid.png),
                    "blob_bytes_on_disk": (blob_dir / "inputs" / f"{ref[7:]}.png").stat().st_size,
                    "redis_record_bytes": store.redis.memory_usage(key),
                    "check_ms": round(check_s * 1000, 1), "upload_ms": round(upload_s * 1000, 1),
                    "same_image_again_ms": round(again_s * 1000, 1)}
            # dedup: one batch of `jobs` jobs sharing one image, given as bytes in every spec
            store.redis.flushdb()
            store.publish_settings({"input_store_url": blob_dir.as_uri()})
            for blob in blob_dir.rglob("*.png"):
                blob.unlink()
            image = encoded(photo(size, 99), "PNG")
            spec = {"model": "tiny-sd15", "prompt": "a fox", "width": size, "height": size}
            start = time.perf_counter()
            client.submit_batch([{**spec, "init_image": image} for _ in range(jobs)])
            with_image_s = time.perf_counter() - start
            start = time.perf_counter()
            client.submit_batch([dict(spec) for _ in range(jobs)])
            without_s = time.perf_counter() - start
            out["dedup"] = {"jobs": jobs, "blobs": len(list(blob_dir.rglob("*.png"))),
                            "input_records": len(store.redis.keys("rf:input:*")),
                            "batch_with_image_ms": round(with_image_s * 1000, 1),
                            "batch_without_image_ms": round(without_s * 1000, 1),
                            "per_job_extra_ms": round((with_image_s - without_s) * 1000 / jobs, 2)}
            client.store.close()
        finally:
            server.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.size, args.jobs, args.repeat)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"image inputs, {args.size}x{args.size} photo-like RGB:")
    for fmt, row in result["formats"].items():
        print(f"  {fmt:4}: sent {row['source_bytes']:>9} B -> stored PNG {row['stored_png_bytes']:>9} B in the blob "
              f"store, {row['redis_record_bytes']} B in Redis; check {row['check_ms']} ms, upload {row['upload_ms']} "
              f"ms, same image again {row['same_image_again_ms']} ms")
    d = result["dedup"]
    print(f"  dedup: {d['jobs']} jobs sharing one image -> {d['blobs']} blob, {d['input_records']} record; batch "
          f"{d['batch_with_image_ms']} ms against {d['batch_without_image_ms']} ms without the image "
          f"({d['per_job_extra_ms']} ms per job)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
