"""Start of every training run: the output folder, the resume guard, the saved config, seeds, device."""
from __future__ import annotations

from pathlib import Path

import torch

from detres.config.load import Config, dump_config
from detres.engine.seeded_data import seed_everything


def resolve_device(name: str) -> torch.device:
    """"auto" = CUDA when available, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def start_run(cfg: Config, *, resume: bool) -> tuple[Path, Path, torch.device]:
    """Create ``cfg.output_dir``, refuse to overwrite a run unless resuming, save the config, seed.

    Returns (output folder, path of the resumable checkpoint ``last.pt``, device).
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path = out / "last.pt"
    if not resume and last_path.exists():
        raise FileExistsError(f"{last_path} exists: pass --resume to continue it or choose another output_dir")
    dump_config(cfg, out / "config.yaml")
    seed_everything(cfg.seed)
    return out, last_path, resolve_device(cfg.device)
