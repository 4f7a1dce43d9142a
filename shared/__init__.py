"""freeze-parity's framework-free package.

Nothing under ``shared`` imports tensorflow, keras or torch: data, checkpoint
format, strategy catalogue, records, comparison, tolerances, reports and the
CLI live here. Framework code is reached through :mod:`shared.frameworks`,
which loads ``torch_impl`` before ``tf_impl`` (the import order that does not
segfault).
"""

__version__ = "0.1.0"
