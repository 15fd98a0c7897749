//! Quantized kernels (filled in by the model runtime issue).
