"""detres: ResNet classification pre-training and Faster R-CNN detection/localization (He et al. 2016)."""

import os as _os

# Nothing in detres may reach the network at run time. albumentations (imported by the detection
# transforms) otherwise asks PyPI for a newer version on import: a DNS look-up and an HTTPS request
# of up to 2 s, and a warning when offline. It checks only this variable, at its own import, which
# every detres module runs after this package's __init__. setdefault: a user's own value still wins.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
