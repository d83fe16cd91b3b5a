"""Classification networks (ResNet, VGG-16, AlexNet), their weights, and their split into a detection trunk and per-
region head."""
