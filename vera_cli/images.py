"""Image files as the models see CIFAR-10: uint8 (3, 32, 32) RGB, by one stated rule.

Anything Pillow reads (PNG, JPEG, GIF's first frame, BMP, WebP, TIFF, ...), turned upright as its
EXIF orientation says. A 32x32 RGB image is taken as it is, so a CIFAR-10 image saved losslessly
gives back its exact pixels. Any other is converted by `RULE`, the same as torchvision's
`Resize(32)` (bilinear, antialiased) then `CenterCrop(32)` on the RGB image.

Pillow refuses images of more than `Image.MAX_IMAGE_PIXELS` pixels (a decompression bomb: a small
file that would expand to gigabytes); so does this module, from the header alone, before decoding.
"""

from __future__ import annotations

import errno
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# CIFAR-10's image size, the only one every model here takes (data.py reads the data set at it).
IMAGE_SIZE = 32

RULE = (f"images other than {IMAGE_SIZE}x{IMAGE_SIZE} RGB are converted to RGB (Pillow's convert: alpha dropped, "
        "grayscale and palettes expanded; 16-bit grayscale scaled to 8 bits first; signed or 32-bit integer and float "
        "images, whose values have no range to scale from, refused), resized so that the short side is "
        f"{IMAGE_SIZE} pixels (bilinear, antialiased) and cropped to the centre {IMAGE_SIZE}x{IMAGE_SIZE}; every image "
        "is first turned upright as its EXIF orientation says (a camera's rotated photo)")


class UnreadableImage(Exception):
    """A file that is not an image this module can use; the message says why."""


@dataclass(frozen=True)
class Picture:
    path: Path
    pixels: torch.Tensor  # uint8 (3, 32, 32)
    width: int
    height: int
    mode: str  # Pillow's mode of the file: RGB, RGBA, L, P, ...

    @property
    def converted(self) -> bool:
        return (self.width, self.height, self.mode) != (IMAGE_SIZE, IMAGE_SIZE, "RGB")

    def describe(self) -> str:
        size = f"{self.width}x{self.height} {self.mode}"
        return f"{size}, converted" if self.converted else size


def image_files(paths: list[str]) -> list[Path]:
    """The files named, in order, with each folder replaced by the image files directly inside it (by Pillow's
    extensions, sorted). A named file is kept whatever its extension: reading it says whether it is an image."""
    extensions = {extension.lower() for extension in Image.registered_extensions()}
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            # A broken link or a loop among the images is reported when read, not dropped; a pipe, socket or device
            # is not an image file (opening a pipe waits for a writer, for ever).
            files += sorted(p for p in path.iterdir()
                            if (p.is_file() or not p.exists()) and p.suffix.lower() in extensions)
        else:
            files.append(path)
    return files


def _size_after(width: int, height: int) -> tuple[int, int]:
    """torchvision's Resize(32) rule: the short side becomes 32, the long side in proportion, rounded down."""
    if width <= height:
        return IMAGE_SIZE, int(IMAGE_SIZE * height / width)
    return int(IMAGE_SIZE * width / height), IMAGE_SIZE


# Formats whose I images are 16-bit grayscale: a PNG in Pillows that open it as I, a PGM of maxval over 255 (which
# Pillow opens as I, its values scaled to 0..65535).
_SIXTEEN_BIT_I = ("PNG", "PPM")


def _integer_kind(source: Image.Image) -> str:
    """What a TIFF's I image holds by its tags (Pillow opens signed 16-bit samples as I too)."""
    tags = getattr(source, "tag_v2", {})
    bits, signed = tags.get(258, (32,))[0], tags.get(339, (1,))[0] == 2
    return f"{'signed ' if signed and bits == 16 else ''}{bits}-bit integer"


def _eight_bit(image: Image.Image, source: Image.Image) -> Image.Image:
    """16-bit grayscale (a PNG's or TIFF's I;16, or I from _SIXTEEN_BIT_I) as 8-bit L, 0..65535 to
    0..255: Pillow's convert would clip every value above 255, turning such an image nearly white. 32-bit integer
    (a TIFF's I), signed 16-bit and float (F) images are refused: their values may lie in 0..1, 0..4095,
    -1000..3000 or anywhere, and Pillow's convert clips them to 0..255 (a float image in 0..1 would come out
    black). `source` is the image as opened: an upright copy (ImageOps.exif_transpose) has no format or tags."""
    if image.mode.startswith("I;16") or (image.mode == "I" and source.format in _SIXTEEN_BIT_I):
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode in ("I", "F"):
        kind = "float" if image.mode == "F" else _integer_kind(source)
        raise UnreadableImage(f"a {kind} image (mode {image.mode}), whose values have no range to scale to 8 bits "
                              "from: save it with 8 or 16 unsigned bits per channel")
    return image


def to_cifar(image: Image.Image, source: Image.Image | None = None) -> Image.Image:
    """`RULE` applied to a Pillow image: a 32x32 RGB image. `source` is the image as opened where `image` is a
    transposed copy, which keeps neither the file's format nor its tags."""
    size, limit = _size_after(*image.size), Image.MAX_IMAGE_PIXELS
    # A long thin strip passes the limit only once resized: the bomb comes from the rule itself. None: a caller
    # turned Pillow's limit off.
    if limit is not None and size[0] * size[1] > limit:
        raise UnreadableImage(f"{image.width:,}x{image.height:,} pixels, which the rule would resize to "
                              f"{size[0]:,}x{size[1]:,}, more than Pillow's limit of {limit:,} pixels "
                              "(Image.MAX_IMAGE_PIXELS): crop it nearer to square first")
    rgb = _eight_bit(image, source or image).convert("RGB")
    if rgb.size == (IMAGE_SIZE, IMAGE_SIZE):
        return rgb
    resized = rgb.resize(size, Image.Resampling.BILINEAR)
    # torchvision's CenterCrop: the top-left corner rounded to the nearest pixel.
    left = int(round((resized.width - IMAGE_SIZE) / 2.0))
    top = int(round((resized.height - IMAGE_SIZE) / 2.0))
    return resized.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))


def read_image(path: Path) -> Picture:
    """The image in `path` as a `Picture`; UnreadableImage says why it cannot be one."""
    try:
        with warnings.catch_warnings():
            # Past MAX_IMAGE_PIXELS Pillow only warns (it refuses at twice that): refuse at the limit itself.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height, mode = image.width, image.height, image.mode
                converted = to_cifar(ImageOps.exif_transpose(image), image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage(f"larger than Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
                              "(Image.MAX_IMAGE_PIXELS; a decompression bomb?)") from None
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("not an image Pillow can read") from None
    except FileNotFoundError:
        raise UnreadableImage("no such file") from None
    except IsADirectoryError:
        raise UnreadableImage("a folder, not a file") from None
    except PermissionError:
        raise UnreadableImage("not readable (permission denied)") from None
    except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError... on a damaged file
        if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
            raise UnreadableImage("a loop of symbolic links") from None
        raise UnreadableImage(f"damaged or truncated ({type(exc).__name__}: {exc})") from None
    pixels = torch.from_numpy(np.array(converted, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return Picture(path, pixels, width, height, mode)
