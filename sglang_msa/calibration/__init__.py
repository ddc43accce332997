"""`sglang-msa calibrate`: fit a router adapter (`models.router_adapter`) on a frozen model.

corpus.py    calibration documents and queries from offline text no benchmark uses
features.py  the frozen model's attention inputs: chunk means per document, query means
fit.py       closed-form whitening init, then MSA's InfoNCE; held-out recall
"""
