"""Shipping a trained model: batch prediction (export and serving come later)."""
