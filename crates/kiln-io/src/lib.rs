//! kiln-io: safetensors reading and writing.
