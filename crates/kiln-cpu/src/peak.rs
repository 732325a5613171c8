//! Machine peak probes: FMA throughput and memory bandwidth (being written).
