//! `kiln gpt2 …`: generate, logits, tokenize, detokenize, init.
use clap::Subcommand;
use kiln_tensor::{Error, Result};

#[derive(Subcommand, Debug)]
pub enum Gpt2Command {}

pub fn run(cmd: Gpt2Command) -> Result<()> {
    let _ = Error::invalid("");
    match cmd {}
}
