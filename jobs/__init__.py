"""clipforge.jobs: wiring only. Each job loads its config, lists its stages from `clipforge.pipeline` and
runs them, in process or through Ray (`ray_build`); `cli` is the thin `clipforge` command over them."""
if __name__ != "clipforge.jobs":
    raise ImportError(f"clipforge's jobs package is imported as `clipforge.jobs`, not `{__name__}`")
