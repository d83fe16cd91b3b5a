"""detres: the detection and localization system of He et al., *Deep Residual Learning for Image Recognition*.

The public API (each name is imported on first use, so ``import detres`` stays light)::

    cfg = detres.load_config("configs/det/shapes_r18.yaml", ["solver.max_iter=100"])
    detres.train_detector(cfg)                                   # also train_classifier, train_localizer
    model, meta = detres.load_detector("runs/det/shapes_r18/model_final.pt")
    predictor = detres.Predictor("runs/det/shapes_r18/model_final.pt")
    result = predictor.predict(image_rgb)                        # boxes in the image's own pixels
    tta = detres.TestTimeAugmentation([model], detres.TestConfig.from_config(cfg))  # Appendix B at test time
    detres.export_detector(model, "runs/export", meta=meta)      # TorchScript + ONNX

The layout behind these names and the layering rules are in docs/architecture.md.
"""

from __future__ import annotations

import importlib
import os as _os
from typing import Any

# Nothing in detres may reach the network at run time. albumentations (imported by the detection
# transforms) otherwise asks PyPI for a newer version on import: a DNS look-up and an HTTPS request
# of up to 2 s, and a warning when offline. It checks only this variable, at its own import, which
# every detres module runs after this package's __init__. setdefault: a user's own value still wins.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

# public name -> the module that defines it (one definition each; nothing here re-implements anything)
_PUBLIC: dict[str, str] = {
    # configure
    "Config": "detres.config.load",
    "load_config": "detres.config.load",
    # build and load
    "build_classifier": "detres.models.build",
    "build_detector": "detres.models.build",
    "load_detector": "detres.models.build",
    "load_classifier": "detres.engine.cls_eval",
    # predict, test-time augmentation, export
    "Predictor": "detres.inference.predictor",
    "TestConfig": "detres.inference.test_config",
    "TestTimeAugmentation": "detres.inference.test_time",
    "export_detector": "detres.inference.export",
    # train
    "train_classifier": "detres.engine.tasks.classification",
    "train_detector": "detres.engine.tasks.detection",
    "train_localizer": "detres.engine.tasks.localization",
    # evaluate
    "evaluate_checkpoint": "detres.engine.cls_eval",
    "test_detector": "detres.engine.det_test",
    "test_localizer": "detres.engine.loc_eval",
    "evaluate_detection_dataset": "detres.evaluation.det_eval",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'detres' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
