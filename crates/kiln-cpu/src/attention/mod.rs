//! Scaled dot-product attention (being written).
