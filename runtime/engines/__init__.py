"""Engines behind one small interface: load, warm up, run a batch, describe, close."""
