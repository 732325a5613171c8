//! Optimisers (being written).
