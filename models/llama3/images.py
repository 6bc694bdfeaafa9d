"""Images into Llama 3.2 Vision's input, as transformers' MllamaImageProcessor (PIL backend) makes
it: pick the tile arrangement (canvas) among the supported aspect ratios, resize keeping the
aspect ratio (PIL bilinear), pad right and bottom, rescale and normalise, split into tiles; and
which text tokens see which image (processing_mllama's cross-attention spans)."""
import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from tinytensor.errors import UserError
from tinytensor.state import CheckpointError, files


class ImageError(UserError, ValueError):
    """An image that cannot be read; the message names the file and what to do."""


@dataclass(frozen=True)
class ImageSettings:
    """preprocessor_config.json's fields that matter (the defaults are the Llama 3.2 Vision ones)."""
    tile_size: int = 560
    max_tiles: int = 4
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255

    @staticmethod
    def from_folder(folder: Path, tile_size: int, max_tiles: int) -> "ImageSettings":
        path = Path(folder) / "preprocessor_config.json"
        if not path.exists():
            return ImageSettings(tile_size, max_tiles)
        try:
            d = json.loads(files.read_text(files.inside(folder, path.name)))
        except (json.JSONDecodeError, RecursionError) as e:
            raise ImageError(f"{path}: not valid JSON ({e})") from None
        try:
            size = d.get("size") or {}
            settings = ImageSettings(int(size.get("height", tile_size)), int(d.get("max_image_tiles", max_tiles)),
                                     tuple(map(float, d.get("image_mean", ImageSettings.mean))),
                                     tuple(map(float, d.get("image_std", ImageSettings.std))),
                                     float(d.get("rescale_factor", 1 / 255)))
        except (AttributeError, TypeError, ValueError) as e:
            raise ImageError(f"{path}: a setting is not of its type ({e})") from None
        if settings.tile_size != tile_size or settings.max_tiles > max_tiles:
            raise ImageError(f"{path}: tiles of {settings.tile_size} px, up to {settings.max_tiles}, but the vision "
                             f"model takes {tile_size} px, up to {max_tiles}")
        return settings


@dataclass
class Pixels:
    """One image as the encoder takes it: all max_tiles tiles (those past the image's are zeros)."""
    values: np.ndarray        # [max_tiles, 3, tile, tile] float32
    aspect_ratio: tuple[int, int]  # (tiles high, tiles wide)
    aspect_ratio_id: int      # 1 + its index among the supported arrangements
    tiles: int                # tiles the image fills: the rest are padding

    @cached_property
    def digest(self) -> str:
        """What the encoder's output depends on, hashed: the same picture sent again (in another
        turn of a conversation, or re-encoded as another file type) has the same digest."""
        h = hashlib.sha256(self.values.tobytes())
        h.update(f"{self.aspect_ratio_id}:{self.tiles}".encode())
        return h.hexdigest()


def open_image(path):
    """An image file as an RGB PIL image, transparency composited on white (as transformers)."""
    path = Path(path)
    try:
        files.regular(path)
    except CheckpointError as e:
        raise ImageError(str(e).replace(": missing", ": no such image file")) from None
    return _decoded(path, str(path))


def image_from_bytes(data: bytes, name: str = "the image"):
    """An image file's bytes (e.g. from a data: URL) as open_image reads a file."""
    return _decoded(io.BytesIO(data), name)


def _decoded(source, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # past Pillow's pixel bound it warns; twice past, it refuses
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused: {str(e).rstrip('.')}; give a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: not an image Pillow can read (JPEG, PNG, WebP...): {e}") from None
    return to_rgb(image)


def to_rgb(image):
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image.convert("RGB")


def aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    return [(h, w) for h in range(1, max_tiles + 1) for w in range(1, max_tiles + 1) if h * w <= max_tiles]


def best_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The canvas (in tiles, high x wide) that needs the least upscaling, or if every one
    shrinks the image, the least downscaling; ties go to the smallest area."""
    scales = []
    for h, w in aspect_ratios(max_tiles):
        scales.append((min(h * tile / height, w * tile / width), h, w))
    ups = [s for s in scales if s[0] >= 1]
    chosen = min(s[0] for s in ups) if ups else max(s[0] for s in scales)
    return min(((h * w, (h, w)) for s, h, w in scales if s == chosen))[1]


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """The resized image's size: each side clipped to [tile, canvas], the aspect ratio kept by
    the side that scales least."""
    target_w, target_h = min(max(width, tile), canvas_w), min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def preprocess(image, settings: ImageSettings) -> Pixels:
    """One RGB PIL image -> its tiles, normalised."""
    from PIL import Image

    tile = settings.tile_size
    h_tiles, w_tiles = best_canvas(image.height, image.width, settings.max_tiles, tile)
    new_h, new_w = fit_to_canvas(image.height, image.width, h_tiles * tile, w_tiles * tile, tile)
    resized = np.asarray(image.resize((new_w, new_h), resample=Image.BILINEAR), dtype=np.uint8)
    canvas = np.zeros((h_tiles * tile, w_tiles * tile, 3), np.uint8)
    canvas[:new_h, :new_w] = resized
    scaled = (canvas.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    normal = (scaled - np.array(settings.mean, np.float32)) / np.array(settings.std, np.float32)
    tiles = normal.reshape(h_tiles, tile, w_tiles, tile, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, tile, tile)
    values = np.zeros((settings.max_tiles, 3, tile, tile), np.float32)
    values[:len(tiles)] = tiles
    ratio = (h_tiles, w_tiles)
    return Pixels(values, ratio, aspect_ratios(settings.max_tiles).index(ratio) + 1, len(tiles))


def image_spans(ids: list[int], image_token: int) -> list[tuple[int, int]]:
    """[first, end) token positions that see each image, in the order of its <|image|> token:
    from the token to the next image's token, where consecutive image tokens share the span of
    the last of them; the last span runs on to every generated token (end = -1)."""
    at = [i for i, t in enumerate(ids) if t == image_token]
    spans = [[a, b] for a, b in zip(at, at[1:])] + [[at[-1], -1]] if at else []
    end = -1
    for span in reversed(spans):
        if span[0] == span[1] - 1:
            span[1] = end
        end = span[1]
    return [tuple(s) for s in spans]
