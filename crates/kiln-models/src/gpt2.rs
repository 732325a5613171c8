//! GPT-2 (being written).
