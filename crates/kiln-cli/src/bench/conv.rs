//! `kiln bench conv` (being written).
use clap::Args;
use kiln_tensor::{Error, Result};

#[derive(Args, Debug)]
pub struct ConvArgs {
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ConvArgs, transposed: bool) -> Result<()> {
    let _ = transposed;
    Err(Error::invalid(format!(
        "bench conv: not built yet ({args:?})"
    )))
}
