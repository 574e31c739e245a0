//! The `keyroll` binary: parse the command line, run the command, print the
//! error once and exit 0 (success), 1 (runtime failure) or 2 (usage error or
//! invalid config).

use std::process::ExitCode;

/// No core dump may hold a private key, whichever command runs: the core
/// size limit is 0 (soft and hard, so nothing in the process can raise it),
/// and the process is not dumpable, which also keeps other processes of
/// the same user from attaching with ptrace or reading `/proc/<pid>/mem`.
/// First thing in `main`, before any key is loaded. Under the systemd unit
/// (`LimitCORE=0`) the limit is already 0 and is left as it is.
fn forbid_core_dumps() -> std::io::Result<()> {
    use rustix::process::{
        getrlimit, set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit,
    };
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if getrlimit(Resource::Core) != none {
        setrlimit(Resource::Core, none)?;
    }
    set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = forbid_core_dumps() {
        eprintln!("keyroll: cannot turn off core dumps, which could hold private keys: {e}");
        return ExitCode::FAILURE;
    }
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
