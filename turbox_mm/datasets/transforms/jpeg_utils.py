"""JPEG helpers of the turbox image loaders: header and scan checks read from the bytes (no
decode), and the uint8 block average the loaders use after a DCT-scaled decode."""
import struct
from typing import Optional, Tuple

import cv2
import numpy as np

_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_info(data: bytes) -> Optional[Tuple[int, int, int, int]]:
    """Read size, components and EXIF orientation from a JPEG's headers, without decoding.

    Args:
        data (bytes): The file's content.

    Returns:
        tuple or None: ``(height, width, components, orientation)`` (orientation 1 when the
        file has no EXIF orientation), or None when ``data`` is not a JPEG (no SOI marker).

    Raises:
        ValueError: The JPEG's markers are broken or it has no frame header.

    Examples:
        >>> import cv2, numpy as np
        >>> ok, buf = cv2.imencode('.jpg', np.zeros((12, 20, 3), np.uint8))
        >>> jpeg_info(buf.tobytes())
        (12, 20, 3, 1)
    """
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    n, i, orientation = len(data), 2, 1
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f'broken JPEG marker at byte {i}')
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            raise ValueError(f'truncated JPEG segment 0x{marker:02X} at byte {i}')
        if marker in _SOF_MARKERS:
            if length < 8:
                raise ValueError('truncated JPEG frame header')
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            return height, width, data[i + 9], orientation
        if marker == 0xE1 and data[i + 4:i + 10] == b'Exif\x00\x00':
            orientation = _exif_orientation(data[i + 10:i + 2 + length])
        if marker in (0xDA, 0xD9):  # scan or end before any frame header
            break
        i += 2 + length
    raise ValueError('no JPEG frame header (SOF) found')


def jpeg_scan_complete(data: bytes) -> bool:
    """Whether a JPEG's compressed data ends with its end-of-image marker (a cut file does
    not). Decoders accept a cut file (OpenCV fills the missing part grey with a warning,
    nvJPEG may fail), so the deferred-decode loader checks it.

    The marker segments are walked to the first scan (an EXIF thumbnail's own end marker,
    inside its segment, does not count); an ``FF D9`` after the scan's start must follow (the
    coded data cannot contain one: an ``FF`` byte there is stuffed, restart markers are
    ``FF D0``-``FF D7``). Bytes after the marker are allowed.

    Args:
        data (bytes): The file's content; a JPEG (:func:`jpeg_info` is not None).

    Examples:
        >>> import cv2, numpy as np
        >>> ok, buf = cv2.imencode('.jpg', np.zeros((12, 20, 3), np.uint8))
        >>> jpeg_scan_complete(buf.tobytes()), jpeg_scan_complete(buf.tobytes()[:-40])
        (True, False)
    """
    n, i = len(data), 2
    while i + 4 <= n:
        marker = data[i + 1]
        if data[i] != 0xFF:
            return False
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        if marker == 0xDA:
            return data.rfind(b'\xff\xd9', i) > i
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return False


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag of a TIFF (EXIF) block's first IFD; 1 when absent or unreadable."""
    try:
        order = {b'II': '<', b'MM': '>'}[bytes(tiff[:2])]
        (ifd, ) = struct.unpack(order + 'I', tiff[4:8])
        (count, ) = struct.unpack(order + 'H', tiff[ifd:ifd + 2])
        for k in range(count):
            entry = ifd + 2 + 12 * k
            tag, _, _ = struct.unpack(order + 'HHI', tiff[entry:entry + 8])
            if tag == 0x0112:
                return struct.unpack(order + 'H', tiff[entry + 8:entry + 10])[0]
    except (KeyError, struct.error):
        pass
    return 1


def block_average(img: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor x factor`` blocks, with the geometry of a DCT-scaled JPEG decode.

    The last row and column of blocks are completed by repeating the edge, so the output is
    ``ceil(H / factor) x ceil(W / factor)`` and full-resolution pixel centre ``x + 0.5``
    maps to ``(x + 0.5) / factor``, as libjpeg-turbo's scaled decoding maps it.

    Args:
        img (np.ndarray): ``(H, W)`` or ``(H, W, C)``.
        factor (int): Block size.

    Returns:
        np.ndarray: The smaller image, of ``img``'s dtype.

    Examples:
        >>> block_average(np.arange(6, dtype=np.uint8).reshape(2, 3), 2).tolist()
        [[2, 4]]
    """
    h, w = img.shape[:2]
    out_h, out_w = -(-h // factor), -(-w // factor)
    pad = ((0, out_h * factor - h), (0, out_w * factor - w)) + ((0, 0), ) * (img.ndim - 2)
    if any(p[1] for p in pad):
        img = np.pad(img, pad, mode='edge')
    out = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA)
    if img.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out
