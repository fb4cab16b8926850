"""Step 2 seconds: the global photometric fit at SCIENCE.md's scale (900 zeropoints, 20,000
stars, ~440,000 observations), Schur complement vs one sparse least-squares solve (lsqr).

`solve_band` is the whole fit: 5 clipping passes, the variable cut, 2 solves and one with the
visit + detector model's prior, each a Schur solve. The lsqr figure is a single solve of the
same system. Zeropoint accuracy is printed against the simulated truth.
Run: make bench (or python bench/global_calib.py).
"""

from __future__ import annotations

import time

import numpy as np
from scipy.sparse.linalg import lsqr

from drp_flows.tasks.global_calib import (
    least_squares_system,
    repeated_observations,
    schur_solve,
    solve_band,
)


def main():
    rng = np.random.default_rng(3)
    obs, ref, true_zp, true_mag = repeated_observations(rng, 100, 9, 20000, 22, sky_var=5000.0,
                                                        mags=(16.0, 22.0), ref_every=40)
    prelim = {(int(v), int(d)): 31.0 for v, d in zip(obs["visit"], obs["detector"], strict=True)}
    start = time.perf_counter()
    sol = solve_band(obs, ref, "r", prelim, sys_floor=0.0)
    fit = time.perf_counter() - start
    zp = np.asarray(sol.zeropoints["zero_point"])
    idx = sol.zeropoints["visit"] * 9 + sol.zeropoints["detector"]
    err = (zp - true_zp[idx]) * 1000

    # one solve of the same normal equations both ways
    z = np.asarray(obs["visit"] * 9 + obs["detector"])
    s = np.asarray(obs["isolated_star_id"])
    n_z, n_s = len(true_zp), len(true_mag)
    prior_w = np.where(np.arange(n_s) % 40 == 0, 1 / 0.01 ** 2, 0.0)
    args = (z, s, -2.5 * np.log10(np.asarray(obs["psf_flux"])), np.asarray(obs["snr"] / 1.0857) ** 2,
            n_z, n_s, np.where(prior_w > 0, np.asarray(ref["r_mag"]), 0.0), prior_w,
            np.full(n_z, 31.0), np.full(n_z, 1 / 0.5 ** 2))
    start = time.perf_counter()
    schur_solve(*args)
    t_schur = time.perf_counter() - start
    start = time.perf_counter()
    result = lsqr(*least_squares_system(*args), atol=1e-10, btol=1e-10, iter_lim=20000)
    t_lsqr = time.perf_counter() - start

    print(f"global calibration: {len(true_zp)} zeropoints, {len(true_mag)} stars, "
          f"{len(obs)} observations")
    print(f"  whole fit (8 Schur solves, clipping): {fit:.2f} s; zeropoints vs truth "
          f"{np.sqrt(np.mean(err ** 2)):.2f} mmag rms")
    print(f"  one solve: Schur {t_schur:.3f} s, lsqr {t_lsqr:.1f} s ({result[2]} iterations): "
          f"{t_lsqr / t_schur:.0f}x")


if __name__ == "__main__":
    main()
