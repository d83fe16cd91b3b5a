"""Appendix C localization: the per-class RPN and the RoI-centric R-CNN localizer."""
