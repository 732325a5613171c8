//! What this machine can hold: a run's memory need is estimated before anything is allocated
//! and refused with an error (instead of an allocation failure that aborts the process, or the
//! kernel's out-of-memory killer) when it is more than the memory available.
use kiln_tensor::{Error, Result};

/// Bytes of memory this machine has available now (`MemAvailable` of `/proc/meminfo`), if known.
pub fn available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// An error when `need` bytes are more than the memory available (none when that is unknown);
/// `what` says what needs them and `hint` how to need less.
pub fn check(need: u64, what: &str, hint: &str) -> Result<()> {
    match available() {
        Some(avail) if need > avail => Err(Error::Capacity(format!(
            "{what} needs about {:.1} GiB, {:.1} GiB are available ({hint})",
            need as f64 / (1u64 << 30) as f64,
            avail as f64 / (1u64 << 30) as f64
        ))),
        _ => Ok(()),
    }
}
