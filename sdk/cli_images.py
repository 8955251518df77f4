"""What the commands that read images share: the detector options (``--min-face``,
``--score``), the pixel limit (``--max-pixels``), one image's faces without letting it stop
the others, and OpenCV's log lines kept off the CLI's stderr."""
from __future__ import annotations

import logging

from .errors import KpfaceError
from .imageheader import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV

log = logging.getLogger("kpface")


def add_detector_options(parser) -> None:
    """``--min-face`` / ``--score``: what the detector reports (None keeps its defaults)."""
    parser.add_argument("--min-face", type=float, metavar="F",
                        help="smallest face to find: below 1 a fraction of the image's shorter "
                        "side, else pixels (MTCNN default 0.1, at least 20 px)")
    parser.add_argument("--score", type=float, metavar="S",
                        help="final detector score a face needs (MTCNN default 0.9; "
                        "RetinaFace: its manifest's, 0.5)")


def add_image_options(parser) -> None:
    parser.add_argument("--max-pixels", type=int, metavar="N",
                        help="refuse image files whose header declares more pixels, before "
                        f"decoding (default ${MAX_PIXELS_ENV} or {DEFAULT_MAX_PIXELS:,})")


def faces_of(pipe, path, max_pixels):
    """(image, faces) of one file, or a KpfaceError; a bug is turned into one too, so that
    one image cannot stop the others."""
    from .image import load_image
    try:
        image = load_image(path, max_pixels=max_pixels)
        return image, pipe(image)
    except KpfaceError:
        raise
    except Exception as e:  # noqa: BLE001 - reported per image, the run goes on
        log.debug("%s", path, exc_info=True)
        raise KpfaceError(f"{path}: internal error: {type(e).__name__}: {e} (re-run with "
                          "--debug for the traceback)") from e


def quiet_opencv() -> None:
    """OpenCV logs every image it cannot decode on stderr ("[ERROR:0@2.4] global
    loadsave.cpp ..."), on top of kpface's own one-line error: the CLI keeps only its own
    line (``--debug`` keeps OpenCV's). Library users keep OpenCV's setting."""
    try:
        import cv2
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except Exception:  # noqa: BLE001 - an OpenCV build without the logging module
        pass
