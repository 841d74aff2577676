"""Datasets for itm: the synthetic image-caption world and the bundled samples."""
