"""Pipelines: SL-CAI (critique -> revision -> SFT) and iterated online RL-CAI."""
