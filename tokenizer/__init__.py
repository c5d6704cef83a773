"""clipforge.tokenizer: the VQ image tokenizer (model, training, evaluation) and the sentencepiece text
tokenizer, each with symmetric `encode`/`decode`."""
if __name__ != "clipforge.tokenizer":
    raise ImportError(f"clipforge's tokenizer package is imported as `clipforge.tokenizer`, not `{__name__}`")
