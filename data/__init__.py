"""Data for itm: the synthetic image-caption world (synth/), the bundled samples (samples/), the demo bundle
(demo/, package data) and generated corpora for tests and benchmarks (corpora.py)."""
