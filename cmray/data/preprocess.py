"""Image preparation for shards, as the reference LSUN script does it, and payload encoding.

The reference (openai/consistency_models ``datasets/lsun_bedroom.py``) scales the short side to
R with PIL's BOX filter, rounds the long side, and takes the central R x R crop. Keeping that
exactly matters: FID reference statistics are computed from images prepared this way.
"""

from __future__ import annotations

import io

from PIL import Image

ENCODINGS = ("png", "webp", "webp_lossless", "jpeg")
RESAMPLE = {
    "box": Image.Resampling.BOX,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}
_EXTENSION = {"png": "png", "webp": "webp", "webp_lossless": "webp", "jpeg": "jpg"}


def resize_short_side(img: Image.Image, R: int, resample: str = "box") -> Image.Image:
    """Scale so the short side is R; the long side is round(scale * side) as in the reference."""
    width, height = img.size
    scale = R / min(width, height)
    size = (round(scale * width), round(scale * height))
    return img if size == img.size else img.resize(size, resample=RESAMPLE[resample])


def center_crop(img: Image.Image, R: int) -> Image.Image:
    """The central R x R window; offsets floor towards the top-left as the reference's do."""
    width, height = img.size
    left, top = (width - R) // 2, (height - R) // 2
    return img.crop((left, top, left + R, top + R))


def prepare_image(img: Image.Image, R: int, resample: str = "box") -> Image.Image:
    """RGB, short side to R, central crop: the whole reference preparation."""
    return center_crop(resize_short_side(img.convert("RGB"), R, resample), R)


def extension(encoding: str) -> str:
    """The file extension a payload gets inside a shard, which also tells readers its codec."""
    return _EXTENSION[encoding]


def encode_image(img: Image.Image, encoding: str = "png", quality: int = 95) -> bytes:
    """Encode for a shard; png and webp_lossless keep every pixel, webp and jpeg use quality."""
    buf = io.BytesIO()
    if encoding == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif encoding == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    elif encoding == "webp_lossless":
        img.save(buf, format="WEBP", lossless=True, quality=quality, method=4)
    elif encoding == "jpeg":
        img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        raise ValueError(f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    return buf.getvalue()


def open_image(payload: bytes) -> Image.Image:
    """Decode image bytes fully now, so a corrupt payload fails here rather than later."""
    img = Image.open(io.BytesIO(payload))
    img.load()
    return img
