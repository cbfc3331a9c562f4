"""The shipped YAML configs (read with importlib.resources, so a wheel carries them)."""
