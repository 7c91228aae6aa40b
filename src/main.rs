//! The `tango-auth-proxy` binary: parse arguments, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tango_auth_proxy::cli::Cli::parse();
    tango_auth_proxy::logging::init();
    match cli.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tango-auth-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
