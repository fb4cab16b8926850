"""Master calibrations (cp_pipe's job): median-combined biases, darks and twilight flats.

Flats are normalised by the median over the whole raft, so relative QE between detectors
survives flat-fielding as it does in Rubin's cpFlat.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from drp_flows.tasks.camera import Camera
from drp_flows.tasks.isr import assemble


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    return np.median(np.stack(frames), axis=0).astype(np.float32)


def master_bias(raws: list[fits.HDUList], camera: Camera, detector: int) -> np.ndarray:
    return _stack([assemble(r, camera, detector)[0] for r in raws])


def master_dark(raws: list[fits.HDUList], camera: Camera, detector: int,
                bias: np.ndarray) -> np.ndarray:
    """Dark current in e-/s."""
    return _stack([(assemble(r, camera, detector)[0] - bias) / r[0].header["DARKTIME"]
                   for r in raws])


def master_flat(raws: list[fits.HDUList], camera: Camera, detector: int, bias: np.ndarray,
                dark: np.ndarray) -> np.ndarray:
    """Un-normalised flat (e-); see normalize_flats."""
    return _stack([assemble(r, camera, detector)[0] - bias - dark * r[0].header["DARKTIME"]
                   for r in raws])


def normalize_flats(flats: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    level = np.median([np.median(f) for f in flats.values()])
    return {d: (f / level).astype(np.float32) for d, f in flats.items()}
