"""The project's own PyTorch reference implementations (the `torch` extra):
written from the papers and upstream semantics for parity tests, scripts/parity.py
and `benchmark.py --compare-torch`. One module per model family, e.g.
`cgrseg_jax.torch_reference.cgrseg`."""
