//! The `kiln` command line; all of its logic lives in the `kiln-cli` crate.
fn main() -> std::process::ExitCode {
    kiln_cli::main()
}
