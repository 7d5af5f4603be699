"""The face pass (`faces=auto`): find faces, restore each again where SUPIR has enough latent positions, blend back.

A face 80 px across in a group photo gets 10 × 10 latent positions in the main pass: too few for SUPIR to draw
eyes and skin. Here each face's square region is cut from the input, restored again at a size where the face spans
`face_size` pixels (64 latent positions at 512), and blended into the plain restoration with a feathered mask.
The pipeline (`RestorationPipeline._face_pass`) runs the sampler; this module finds the faces, plans the regions
and blends.

The detector: OpenCV's Haar cascade for frontal faces, kept only where a second cascade finds a pair of eyes in the
box's upper part. Its weights ship inside the opencv-python-headless wheel (BSD licence: nothing to fetch or
verify), it runs in tens of milliseconds on a CPU and gives the same boxes every time. The cascade alone also fires
on cats, grass and gravel once a small photo is enlarged; the eye pair removes those. Precision comes before recall
on purpose: a missed face keeps the plain restoration, a false one would be re-sampled with a face hint. Stronger
detectors (YuNet, RetinaFace) need weights fetched separately; `FaceDetector` is the protocol they would plug into.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .colorfix import wavelet_color_fix

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (pixels, x1/y1 exclusive)
FACE_HINT = "a close-up photo of a person's face, natural skin texture, sharp eyes"
REGION_SCALE = 1.5  # a face's region: its box grown to a square 1.5 × its side (hair, chin, some background)


@dataclass(frozen=True)
class FaceBox:
    """A face found in the input, in input pixels."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def side(self) -> int:
        return max(self.x1 - self.x0, self.y1 - self.y0)

    def overlaps(self, other: FaceBox) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1


class FaceDetector(Protocol):
    name: str

    def __call__(self, rgb: Image.Image) -> list[FaceBox]: ...


class HaarFaceDetector:
    """Frontal faces that show a pair of eyes (see the module's docstring for why this detector)."""

    name = "opencv-haar-frontalface+eye-pair"

    def __init__(self, min_neighbors: int = 5, short_side: int = 512, long_side_cap: int = 2048) -> None:
        self.min_neighbors = min_neighbors
        self.short_side = short_side  # small photos are enlarged first: the cascade's smallest face is 24 px
        self.long_side_cap = long_side_cap
        self._lock = threading.Lock()
        self._cascades: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        import cv2

        with self._lock:
            if self._cascades is None:
                root = cv2.data.haarcascades  # type: ignore[attr-defined]  # the wheel's data folder, untyped
                face = cv2.CascadeClassifier(root + "haarcascade_frontalface_default.xml")
                eye = cv2.CascadeClassifier(root + "haarcascade_eye.xml")
                if face.empty() or eye.empty():
                    raise RuntimeError(f"OpenCV's Haar cascades are missing from {root}")
                self._cascades = (face, eye)
            return self._cascades

    def __call__(self, rgb: Image.Image) -> list[FaceBox]:
        import cv2

        face_cascade, eye_cascade = self._load()
        scale = min(max(1.0, self.short_side / min(rgb.size)), self.long_side_cap / max(rgb.size))
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        image = rgb.convert("RGB").resize(size, Image.Resampling.BICUBIC) if size != rgb.size else rgb.convert("RGB")
        gray = cv2.equalizeHist(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2GRAY))
        found = face_cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=self.min_neighbors, minSize=(24, 24))
        boxes = []
        for x, y, w, h in (tuple(int(v) for v in f) for f in found):
            if _has_eye_pair(eye_cascade, gray[y : y + h, x : x + w]):
                box = (x / scale, y / scale, (x + w) / scale, (y + h) / scale)
                boxes.append(_clamped(box, rgb.size))
        return _merged(boxes)


def _has_eye_pair(eye_cascade: Any, face: np.ndarray) -> bool:
    """Two eyes in the upper 60% of a face box, one in each half, about level."""
    import cv2

    upper = face[: max(1, int(face.shape[0] * 0.6))]
    width = 96
    upper = cv2.resize(upper, (width, max(1, round(upper.shape[0] * width / upper.shape[1]))))
    eyes = eye_cascade.detectMultiScale(upper, scaleFactor=1.05, minNeighbors=3, minSize=(12, 12))
    centres = [(x + w / 2, y + h / 2) for x, y, w, h in eyes]
    left = [c for c in centres if c[0] < width / 2]
    right = [c for c in centres if c[0] >= width / 2]
    return any(abs(a[1] - b[1]) < 0.2 * width for a in left for b in right)


def _clamped(box: tuple[float, float, float, float], size: tuple[int, int]) -> FaceBox:
    x0, y0, x1, y1 = box
    return FaceBox(
        max(0, math.floor(x0)), max(0, math.floor(y0)), min(size[0], math.ceil(x1)), min(size[1], math.ceil(y1))
    )


def _merged(boxes: list[FaceBox]) -> list[FaceBox]:
    """Largest first; a box overlapping a larger one is the same face."""
    kept: list[FaceBox] = []
    for box in sorted(boxes, key=lambda b: (-b.side, b.y0, b.x0)):
        if not any(box.overlaps(k) for k in kept):
            kept.append(box)
    return kept


@dataclass(frozen=True)
class FaceRegion:
    """One face and the square around it: cut from the input (`source`), blended into the output (`target`)."""

    box: FaceBox
    source: Box  # input pixels
    target: Box  # output pixels
    restored: bool  # False: the face already spanned face_size pixels where the main pass sampled it
    edges: tuple[bool, bool, bool, bool] = (False, False, False, False)  # left, top, right, bottom on the photo's edge

    def metadata(self, seconds: float) -> dict[str, Any]:
        box = [self.box.x0, self.box.y0, self.box.x1, self.box.y1]
        return {"box": box, "region": list(self.target), "restored": self.restored, "seconds": round(seconds, 4)}


def restored_side(face_size: int) -> int:
    """The side (image pixels, a multiple of 64) a region is restored at: its face then spans ≥ face_size."""
    return math.ceil(REGION_SCALE * face_size / 64) * 64


def plan_regions(
    boxes: list[FaceBox],
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    process_size: tuple[int, int],
    face_size: int,
    max_faces: int,
) -> list[FaceRegion]:
    """The largest `max_faces` faces' regions: squares around each face, moved (not shrunk) to stay inside the
    photo, shrunk only where the photo is smaller. A face is restored again only if it spanned fewer than
    face_size pixels at the processing size: that, not the output size, set its latent positions in the main pass."""
    width, height = input_size
    sx, sy = output_size[0] / width, output_size[1] / height
    process_scale = process_size[0] / width
    regions = []
    for box in boxes[:max_faces]:
        side = min(round(REGION_SCALE * box.side), width, height)
        cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
        x0 = min(max(0, round(cx - side / 2)), width - side)
        y0 = min(max(0, round(cy - side / 2)), height - side)
        target = (round(x0 * sx), round(y0 * sy), round((x0 + side) * sx), round((y0 + side) * sy))
        edges = (x0 == 0, y0 == 0, x0 + side == width, y0 + side == height)
        small = box.side * process_scale < face_size
        regions.append(FaceRegion(box, (x0, y0, x0 + side, y0 + side), target, small, edges))
    return regions


def feather_mask(height: int, width: int, edges: tuple[bool, bool, bool, bool] = (False,) * 4) -> torch.Tensor:
    """1 inside, easing to 0 at the border over a sixth of the side (smoothstep of the distance to the edge); no
    easing on a side that lies on the photo's own edge (`edges`: left, top, right, bottom), where there is no seam."""
    ramp = max(2.0, min(height, width) / 6)
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    far = torch.tensor(float("inf"), dtype=torch.float64)
    left, top, right, bottom = edges
    dx = torch.minimum(far if left else xs, far if right else width - xs)[None, :]
    dy = torch.minimum(far if top else ys, far if bottom else height - ys)[:, None]
    t = (torch.minimum(dy, dx) / ramp).clamp(0, 1)
    return t * t * (3 - 2 * t)


def blend_face(plain: np.ndarray, face: torch.Tensor, region: FaceRegion, quantize: str) -> None:
    """Blend a restored face ([1, 3, h, w] in [−1, 1], any size) into `plain` (H × W × 3 uint8, changed in place)
    within the region's target only. Colours first: the face keeps its detail and takes the plain restoration's
    low frequencies (wavelet), which also hides the seam. Where the mask is 0 the pixel keeps its exact value."""
    x0, y0, x1, y1 = region.target
    if x1 <= x0 or y1 <= y0:
        return
    patch = torch.from_numpy(plain[y0:y1, x0:x1].astype(np.float64))  # h × w × 3 levels
    reference = (patch.permute(2, 0, 1)[None] / 127.5 - 1).float()
    antialias = face.shape[-1] > x1 - x0 or face.shape[-2] > y1 - y0
    face = F.interpolate(face.float(), size=(y1 - y0, x1 - x0), mode="bicubic", antialias=antialias)
    face = wavelet_color_fix(face, reference)
    levels = ((face[0].clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).double()
    mask = feather_mask(y1 - y0, x1 - x0, region.edges)[..., None]
    mixed = patch + mask * (levels - patch)
    mixed = mixed.round() if quantize == "round" else mixed.floor()
    plain[y0:y1, x0:x1] = mixed.clamp(0, 255).to(torch.uint8).numpy()


def face_seed(seed: int, face: int) -> int:
    """Face j of the sample with `seed` draws from seed + 7919·(j + 1) (mod 2³¹): fixed per face and sample, apart
    from the samples' own seeds (seed + i) for any photo with fewer than 7919 samples between them."""
    return (seed + 7919 * (face + 1)) % 2**31


@dataclass
class FacePass:
    """What the face pass found and did (the job's `faces` metadata)."""

    detector: str
    face_size: int
    restored_size: int
    regions: list[FaceRegion] = field(default_factory=list)
    face_seconds: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # detect, restore, blend

    def metadata(self) -> dict[str, Any]:
        shares = self.face_seconds or [0.0] * len(self.regions)
        return {
            "policy": "auto",
            "detector": self.detector,
            "face_size": self.face_size,
            "restored_size": self.restored_size,
            "faces": [r.metadata(s) for r, s in zip(self.regions, shares, strict=True)],
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }
