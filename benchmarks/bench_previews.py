"""CPU time of the review-app previews of one analysis (26 PNGs), in this checkout.

Why: the previews are rendered before the result is published, so their cost is latency
(docs/benchmarks.md, "Previews without matplotlib"). A 40×96×192 study-sized volume, an ROI over
7 slices (5 slice sets rendered) and the three maps; best of three after a warm-up call.

    .venv/bin/python benchmarks/bench_previews.py
    PYTHONPATH=<other checkout> .venv/bin/python benchmarks/bench_previews.py   # to compare
"""

from __future__ import annotations

import time

import numpy as np

from dicom_node.analysis.previews import analysis_previews


def main() -> int:
    """Print the number and size of the previews and the CPU seconds per analysis."""
    rng = np.random.default_rng(0)
    shape = (40, 96, 192)
    z, y, x = np.indices(shape)
    body = ((y - 48) ** 2 / 40**2 + (x - 96) ** 2 / 80**2) < 1
    under = np.where(body, 800 + 100 * rng.random(shape), 0.0)
    maps = {
        k: np.where(body, v * (1 + 0.2 * rng.standard_normal(shape)), 0.0)
        for k, v in (("adc", 1.2e-3), ("dapp", 1.4e-3), ("kapp", 0.9))
    }
    roi = ((y - 50) ** 2 + (x - 70) ** 2 < 64) & (np.abs(z - 20) < 4)

    def render() -> dict[str, bytes]:
        return analysis_previews(
            maps,
            roi,
            roi_confirmed=False,
            underlay=under,
            high_b=under * 0.3,
            orientation=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
            shown={k: body for k in maps},
            histogram_voxels={k: body for k in maps},
            bin_widths={"adc": 2.5e-5, "dapp": 2.5e-5, "kapp": 0.025},
            bin_min=0.0,
        )

    render()  # warm: imports, fonts, colour tables
    seconds = []
    for _ in range(3):
        started = time.process_time()
        out = render()
        seconds.append(time.process_time() - started)
    size_kb = sum(map(len, out.values())) / 1e3
    print(
        f"{len(out)} previews, {size_kb:.0f} kB; CPU s per analysis: "
        + " ".join(f"{s:.2f}" for s in seconds)
        + f"; best {min(seconds):.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
