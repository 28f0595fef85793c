"""Built-in plugins, on the same Plugin protocol external plugins use."""
