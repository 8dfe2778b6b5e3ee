"""llamatron: PyTorch-native Llama 3.1 pretraining."""

__version__ = "0.1.0"
