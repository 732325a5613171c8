//! `kiln bench matmul` (being written).
use clap::Args;
use kiln_tensor::{Error, Result};

#[derive(Args, Debug)]
pub struct MatmulArgs {
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: MatmulArgs) -> Result<()> {
    Err(Error::invalid(format!(
        "bench matmul: not built yet ({args:?})"
    )))
}
