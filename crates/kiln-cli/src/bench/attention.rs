//! `kiln bench attention` (being written).
use clap::Args;
use kiln_tensor::{Error, Result};

#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: AttentionArgs) -> Result<()> {
    Err(Error::invalid(format!(
        "bench attention: not built yet ({args:?})"
    )))
}
