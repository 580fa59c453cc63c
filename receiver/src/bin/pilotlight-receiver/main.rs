//! `pilotlight-receiver`: the staging-host side of pilotlight.
//!
//! `cli` holds the arguments; each group of subcommands has a module:
//! `setup` (init, rebuild, enroll, revoke, grant), `serving` (serve,
//! export, drill), `history` (points, restore, verify, prune, gc) and
//! `report` (status).

mod cli;
mod history;
mod report;
mod serving;
mod setup;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Cmd, LogFormat};
use pilotlight_protocol::process;

fn main() -> ExitCode {
    let cli = Cli::parse();
    process::init_logging(matches!(cli.log_format, LogFormat::Json));
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pilotlight-receiver: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Init {
            dir,
            listen,
            store,
            object_lock_days,
        } => {
            setup::init(&dir, listen.as_deref(), store.as_deref(), object_lock_days)?;
        }
        Cmd::Rebuild { dir, store, key } => setup::rebuild(&dir, &store, key.as_deref())?,
        Cmd::Enroll {
            dir,
            server,
            operator,
            out,
        } => setup::enroll(&dir, (server, operator), &out)?,
        Cmd::Revoke { dir, server } => setup::revoke(&dir, &server)?,
        Cmd::Grant(a) => setup::grant(a)?,
        Cmd::Serve(a) => serving::serve(a)?,
        Cmd::Export(a) => serving::export(a)?,
        Cmd::Drill(a) => serving::drill(a)?,
        Cmd::Prune(a) => history::prune(a)?,
        Cmd::Gc { dir, json } => history::gc(&dir, json)?,
        Cmd::Status { dir, json } => report::status(&dir, json)?,
        Cmd::Points { dir, server, json } => history::points(&dir, server.as_deref(), json)?,
        Cmd::Restore(a) => history::restore(a)?,
        Cmd::Verify(a) => return history::verify(a),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "pilotlight-receiver",
                &mut std::io::stdout(),
            );
        }
        Cmd::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
