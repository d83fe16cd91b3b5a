"""Faster R-CNN on a C4 trunk: anchors, RPN, RoI pooling, RoI heads, post-processing, global context."""
