//! kiln-nn: layers, losses and optimisers.
