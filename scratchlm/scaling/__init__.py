"""Scaling laws: IsoFLOP grids of pretraining runs on the embedded corpus, and the fits through them."""
