"""clipforge.model: the CogVideo-style transformer (`gpt`), its data loading from shards (`data`), the
trainer (`train`), the sampler (`sample`) and video writing (`video`)."""
if __name__ != "clipforge.model":
    raise ImportError(f"clipforge's model package is imported as `clipforge.model`, not `{__name__}`")
