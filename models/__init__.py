"""Reference image classifiers and their TorchServe packaging."""
