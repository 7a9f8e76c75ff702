"""steer inside vLLM: an out-of-tree plugin (`plugin.py`) and its request contract
(`requests.py`). Importing steer never imports this package or vLLM; vLLM loads the plugin
through its entry points (pyproject.toml) when steer is installed beside it."""
