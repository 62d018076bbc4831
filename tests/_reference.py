"""The reference models of the quality tests, trained once per test session and shared by every test that needs
them (and by every pytest-xdist worker): a trained model is a fixture, not a per-file setup.

    python tests/_reference.py DIR SEED digits     # what conftest starts in the background under xdist, one each

A model lives in DIR/NAME/model.safetensors; DIR/NAME.lock serialises its training (a file lock, so workers and
the background process agree), DIR/NAME.done marks it finished. The training seed is the session's (random,
printed by the tests): 0 unless DDPM_REFERENCE_SEED says otherwise (``random`` draws one), the seed the quality
bars were measured with; each test draws its own fresh sampling seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from filelock import FileLock

# name -> TrainConfig fields: the dataset defaults (what `ddpm train --data NAME` does) on one CPU thread, with a
# small preview (the quality tests sample for themselves)
REFERENCES: dict[str, dict] = {
    "digits": {"data": "digits", "num_samples": 16},
    "swissroll": {"data": "swissroll", "num_samples": 16},
    # label dropout 0.3 (0.1 leaves the null class ~0.1 behind in classifier confidence at this budget) and the
    # preset's 1500 steps; benchmarks/conditional_cpu.md has the 3000-step model of the acceptance figures
    "digits_cond": {"data": "digits", "cond": "class", "p_uncond": 0.3, "num_samples": 10},
}


def reference(name: str, root: Path, seed: int) -> Path:
    """The checkpoint of reference ``name``, trained now unless another process did (or is doing) it."""
    root.mkdir(parents=True, exist_ok=True)
    done = root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            _train(name, root, seed)
            done.write_text(json.dumps({"seed": seed}))
    return root / name / "model.safetensors"


def _train(name: str, root: Path, seed: int) -> None:
    import torch

    from ddpm.trainer.train import TrainConfig, train

    saved = torch.get_num_threads()
    try:
        cfg = TrainConfig(
            out=root / name, seed=seed, threads=1, progress=False, device="cpu", **REFERENCES[name]
        )
        train(cfg)
    finally:
        torch.set_num_threads(saved)


if __name__ == "__main__":
    folder, seed, names = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    for n in names:
        reference(n, folder, seed)
