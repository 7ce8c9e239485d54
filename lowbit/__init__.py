"""lowbit: post-training quantization of large language models, and an honest measure of what it cost."""

__version__ = "0.1.0"

from lowbit.api import fake_quantize_model, load, load_tokenizer, quantize, save
from lowbit.io.export import export

__all__ = ["__version__", "export", "fake_quantize_model", "load", "load_tokenizer", "quantize", "save"]
