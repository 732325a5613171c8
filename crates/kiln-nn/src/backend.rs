//! The op interface models are written against (being written).
