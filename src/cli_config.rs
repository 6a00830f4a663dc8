//! `vmbackup config show`: the effective settings and their sources (see
//! `vmbackup::config_show`). Which global option came from the command line and which from
//! its environment variable is clap's knowledge: the arguments are parsed again for it.

use clap::parser::ValueSource;
use clap::CommandFactory;
use vmbackup::config::Config;
use vmbackup::config_show::{self, CliOrigin, Inputs};
use vmbackup::error::exit;

use crate::Output;

pub fn cmd_config_show(cfg: &Config, config: Option<&std::path::Path>) -> anyhow::Result<Output> {
    let cmd = crate::cli::Cli::command();
    // The same parse as main's: only the sources of the values are wanted here.
    let matches = cmd.clone().try_get_matches_from(std::env::args_os())?;
    let origin = |id: &str| -> Option<CliOrigin> {
        let arg = cmd.get_arguments().find(|a| a.get_id() == id)?;
        match matches.value_source(id)? {
            ValueSource::CommandLine => Some(CliOrigin::Flag(format!(
                "--{}",
                arg.get_long().unwrap_or(id)
            ))),
            ValueSource::EnvVariable => Some(CliOrigin::Env(
                arg.get_env()?.to_string_lossy().into_owned(),
            )),
            _ => None,
        }
    };
    let file = config_show::load_file(config)?;
    let env = |k: &str| std::env::var(k).ok();
    let shown = config_show::effective(
        cfg,
        &Inputs {
            cli: &origin,
            file: file.as_ref().map(|(p, t)| (p.as_path(), t)),
            env: &env,
        },
    );
    Ok(Output {
        text: config_show::text(&shown),
        json: crate::body(vmbackup::contract::ConfigBody { config: shown }),
        code: exit::OK,
    })
}
