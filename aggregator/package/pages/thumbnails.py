"""One thumbnail per image series, rendered from the DICOM pixels, as a PNG for the summary.

The DICOM files are only read (pydicom from the blob store), never rewritten. The window is the
modality's default a reader would start from: CT soft tissue (mediastinal) W400/L40, or lung
W1500/L-600 when the series says lung; other grey-scale modalities (MR, MG, CR...) an automatic
window over the 1st-99th percentile of the pixel values. A series that cannot be rendered gets
the reason instead of a picture.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SIZE = 192
CT_MEDIASTINAL = (40.0, 400.0)
CT_LUNG = (-600.0, 1500.0)
LUNG_WORDS = ("lung", "chest hr", "pulm", "parench")


@dataclass(frozen=True)
class Thumbnail:
    png: bytes | None
    reason: str
    """Why there is no picture ('' when there is one)."""
    window: str = ""

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png or b"").decode("ascii")


def ct_window(ds: Any) -> tuple[float, float]:
    """(centre, width) for a CT: lung when the series or its kernel says lung, else mediastinal."""
    words = " ".join(str(ds.get(k, "") or "") for k in ("SeriesDescription", "ConvolutionKernel", "ProtocolName"))
    return CT_LUNG if any(w in words.lower() for w in LUNG_WORDS) else CT_MEDIASTINAL


def window_to_uint8(values: Any, centre: float, width: float) -> Any:
    """Linear window (DICOM PS3.3 C.11.2.1.2, simplified): centre-width/2 → 0, centre+width/2 → 255."""
    import numpy as np

    lo = centre - width / 2.0
    scaled = (values.astype(np.float64) - lo) / max(width, 1.0) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def render_frame(ds: Any) -> tuple[Any, str]:
    """(uint8 image array HxW or HxWx3, window description) of an instance's representative frame."""
    import numpy as np

    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if frames > 1:
        arr = arr[frames // 2]
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT") or arr.ndim == 3:
        if photometric.startswith("YBR") and photometric not in ("YBR_ICT", "YBR_RCT"):
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        return np.asarray(arr, dtype=np.uint8) if arr.dtype == np.uint8 else window_to_uint8(
            arr, float(arr.max() + arr.min()) / 2, float(arr.max() - arr.min()) or 1.0), "colour"
    values = arr.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    modality = str(ds.get("Modality", ""))
    if modality == "CT":
        centre, width = ct_window(ds)
        label = f"CT {'lung' if (centre, width) == CT_LUNG else 'mediastinal'} window W{width:g}/L{centre:g}"
    else:
        lo, hi = (float(x) for x in np.percentile(values, [1, 99]))
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max())
        centre, width = (lo + hi) / 2, max(hi - lo, 1.0)
        label = "automatic window (1st-99th percentile)"
    out = window_to_uint8(values, centre, width)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out, label


def _png(img: Any) -> bytes:
    from PIL import Image

    pic = Image.fromarray(img)
    scale = SIZE / max(pic.size)
    if scale < 1:
        pic.thumbnail((SIZE, SIZE), Image.Resampling.LANCZOS)
    elif scale >= 2:  # a small matrix (a 64x64 scout) is enlarged by whole pixels, never smoothed
        factor = int(scale)
        pic = pic.resize((pic.size[0] * factor, pic.size[1] * factor), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pic.save(buf, format="PNG", optimize=False)  # no time or text chunks: the same pixels give the same bytes
    return buf.getvalue()


def render_series(paths: Sequence[tuple[int, str, Path]]) -> Thumbnail:
    """The thumbnail of a series from its instances (instance number, SOP UID, file), middle one first."""
    try:
        import numpy  # noqa: F401
        import pydicom
        from PIL import Image  # noqa: F401
    except ImportError as exc:
        return Thumbnail(None, f"the image libraries are not installed ({exc.name})")
    if not paths:
        return Thumbnail(None, "no instance of this series is in the package")
    ordered = sorted(paths)
    middle = ordered[len(ordered) // 2]
    candidates = [middle, *(p for p in ordered if p is not middle)][:5]
    reason = ""
    for _, uid, path in candidates:
        ds: Any = None
        try:
            ds = pydicom.dcmread(path)  # read-only; the file in the package is never touched
            if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                reason = "the series holds no pixel data (e.g. a structured report or a presentation state)"
                continue
            img, label = render_frame(ds)
            return Thumbnail(_png(img), "", label)
        except Exception as exc:  # a broken or undecodable instance: try another, then say why
            meta = getattr(ds, "file_meta", None)
            ts = str(getattr(meta, "TransferSyntaxUID", "") or "")
            reason = (f"the pixel data could not be decoded ({type(exc).__name__}"
                      + (f"; transfer syntax {ts}" if ts else "") + ")")
            log.info("thumbnail failed for instance %s: %s", uid, type(exc).__name__)
    return Thumbnail(None, reason or "no instance could be rendered")
