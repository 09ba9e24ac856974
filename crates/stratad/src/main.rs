//! `stratad`: a drop-in replacement for `qemu-storage-daemon` — the same command line, QMP
//! monitors, commands, events and NBD exports, on Strata's engine.

mod authz;
mod cli;
mod commands;
mod daemon;
mod exports;
mod metrics;
mod monitor;

use std::process::ExitCode;

fn main() -> ExitCode {
    let argv0 = std::env::args().next().unwrap_or_else(|| "stratad".into());
    let args: Vec<String> = std::env::args().skip(1).collect();
    let plan = match cli::parse(&args) {
        Ok(cli::Parsed::Exit(code, text)) => {
            print!("{text}");
            return ExitCode::from(code);
        }
        Ok(cli::Parsed::Run(plan)) => plan,
        Err(cli::CliError(e)) => {
            eprintln!("{argv0}: {e}");
            return ExitCode::from(1);
        }
    };
    // Fork before any thread exists; the parent waits for the child's startup verdict.
    let ready = if plan.daemonize {
        match cli::daemonize() {
            Ok(Some(code)) => return ExitCode::from(code),
            Ok(None) => true,
            Err(e) => {
                eprintln!("stratad: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        false
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stratad: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(cli::run(plan, ready));
    // Jobs and connections were shut down in order; don't wait for stragglers.
    rt.shutdown_background();
    ExitCode::from(code)
}
