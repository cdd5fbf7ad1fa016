"""The optimizers of the simulation: every device's own element-wise optimizer, and the server optimizers of the
aggregating nodes."""
