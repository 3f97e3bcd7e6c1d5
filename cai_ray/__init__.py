"""cai-ray: Constitutional AI (SL-CAI and iterated online RL-CAI) on Ray, vLLM and DeepSpeed."""

__version__ = "0.1.0"
