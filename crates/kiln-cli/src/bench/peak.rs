//! `kiln bench peak` (being written).
use clap::Args;
use kiln_tensor::{Error, Result};

#[derive(Args, Debug)]
pub struct PeakArgs {
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PeakArgs) -> Result<()> {
    Err(Error::invalid(format!(
        "bench peak: not built yet ({args:?})"
    )))
}
