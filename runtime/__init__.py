"""Torch-free runtime: the model repository contract, serving preprocess, engines and the TensorRT builder."""
