//! The `keyroll` binary: parse the command line, run the command, print the
//! error once and exit 0 (success), 1 (runtime failure) or 2 (usage error or
//! invalid config).

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match keyroll::cli::Cli::try_parse_args() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to
            // stderr (exit 2) itself.
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    match keyroll::cli::main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyroll: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
