"""Built-in passes, installed as ``onnxopt.passes``: one pass per module, module name = pass name with ``_`` for ``-``."""
