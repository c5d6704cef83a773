"""Video: probing, the clip plan (rates, spans, frame indices, crops), frame-exact decoding through decord
or PyAV in an isolated child process, and the synthetic corpus used by the demo and the tests."""
