//! The `kiln` command line. Every failure prints one line `error: …` on stderr and exits 1.
use std::process::ExitCode;

/// Entry point of the `kiln` binary.
pub fn main() -> ExitCode {
    eprintln!("error: no command yet");
    ExitCode::FAILURE
}
