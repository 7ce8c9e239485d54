"""lowbit: post-training quantization of large language models, and an honest measure of what it cost.

The Python API (the README's "Python" section): `quantize` a model by a scheme and method, `save` it, `export` it
for vLLM or llama.cpp, `evaluate` it against its reference; `Recipe` and `CalibConfig` spell out the settings.
"""

__version__ = "0.1.0"

from lowbit.api import evaluate, fake_quantize_model, load, load_tokenizer, quantize, save
from lowbit.data.calibration import CalibConfig
from lowbit.errors import LowbitError
from lowbit.eval.result import EvalResult
from lowbit.io.export import export
from lowbit.recipe import Recipe

__all__ = ["CalibConfig", "EvalResult", "LowbitError", "Recipe", "__version__", "evaluate", "export",
           "fake_quantize_model", "load", "load_tokenizer", "quantize", "save"]
