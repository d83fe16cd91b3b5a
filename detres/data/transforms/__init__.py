"""Image and box transforms for classification, detection and localization."""
