//! The `kiln` command line.
//!
//! Every failure — bad input, a missing file, even an internal panic — prints exactly one line
//! `error: …` on stderr and exits with status 1.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

pub mod bench;
pub mod cuda;
pub mod dcgan;
pub mod device;
pub mod gpt2;
pub mod gpt2_train;
pub mod inspect;
pub mod plot;
pub mod request;
pub mod serve;

#[derive(Parser, Debug)]
#[command(
    name = "kiln",
    version,
    about = "kiln: a from-scratch tensor and kernel engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List the tensors of a safetensors file: name, dtype, shape, bytes; totals.
    Inspect(inspect::InspectArgs),
    /// GPT-2: generate text, compute logits, tokenize, make a checkpoint.
    #[command(subcommand)]
    Gpt2(gpt2::Gpt2Command),
    /// DCGAN: sample images from a generator, train a generator/discriminator pair.
    #[command(subcommand)]
    Dcgan(dcgan::DcganCommand),
    /// Kernel benchmarks: GFLOP/s or GB/s and the fraction of this machine's measured peak.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Serve GPT-2 over HTTP with the OpenAI API (completions, chat, streaming), decoding
    /// concurrent requests together.
    Serve(serve::ServeArgs),
    /// The CUDA device: its properties; compiling the kernels into the kernel cache.
    #[command(subcommand)]
    Cuda(cuda::CudaCommand),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> kiln_tensor::Result<()> {
    match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Gpt2(cmd) => gpt2::run(cmd),
        Command::Dcgan(cmd) => dcgan::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Serve(args) => serve::run(args),
        Command::Cuda(cmd) => cuda::run(cmd),
    }
}

/// Entry point of the `kiln` binary.
pub fn main() -> ExitCode {
    // A panic is a bug, but the user still gets one line, not a trace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error: {}{at}", msg.replace('\n', " "));
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // clap's message is several lines; keep the first, which states the problem.
            let text = e.to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            eprintln!("error: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE, // the hook already printed the line
    }
}

/// The error and its sources on one line.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s.replace('\n', " ")
}
