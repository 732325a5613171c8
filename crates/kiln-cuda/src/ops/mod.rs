//! One function per op. Each validates its sizes against the buffers (a buffer may be longer
//! than the sizes need, never shorter), picks a kernel and launches it on the device's stream.
//! Arguments mean what they mean for the CPU kernels of `kiln-cpu` with the same names.
