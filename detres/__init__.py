"""detres: ResNet classification pre-training and Faster R-CNN detection/localization (He et al. 2016)."""
__version__ = "0.1.0"
