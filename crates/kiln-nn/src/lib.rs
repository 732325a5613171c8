//! kiln-nn: layers (forward and backward side by side), losses and optimisers, and the op
//! interface ([`backend`]) through which models reach the kernels of a device.
pub mod backend;
pub mod layers;
pub mod loss;
pub mod optim;
