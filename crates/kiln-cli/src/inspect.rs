//! `kiln inspect FILE.safetensors [--json]`.
use clap::Args;
use kiln_tensor::{Error, Result};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The safetensors file.
    pub file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    Err(Error::invalid(format!(
        "inspect {}: not built yet",
        args.file.display()
    )))
}
