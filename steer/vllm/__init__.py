"""steer inside vLLM: an out-of-tree plugin (`plugin.py`), its request contract (`requests.py`),
and expert discovery on a vLLM engine (`discovery.py`, the front end; `pooling.py`, the worker).
Importing steer never imports this package or vLLM; vLLM loads the plugin through its entry
points (pyproject.toml) when steer is installed beside it."""
