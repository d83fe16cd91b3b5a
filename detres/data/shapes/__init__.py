"""The shapes world: a seeded generator of toy classification/detection/localization data in standard formats."""
