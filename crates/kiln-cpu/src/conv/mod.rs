//! 2-D convolution and transposed convolution (being written).
