//! `vmbackup completions SHELL` and `vmbackup man [--dir DIR]`: shell completions and man
//! pages made from the command definitions themselves (clap_complete, clap_mangen), so they
//! never drift from `--help`.

use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory;

use vmbackup::error::exit;
use vmbackup::Error;

use crate::cli::Cli;
use crate::Output;

pub fn cmd_completions(shell: clap_complete::Shell) -> anyhow::Result<Output> {
    let mut cmd = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "vmbackup", &mut script);
    let script = String::from_utf8(script)?;
    Ok(Output {
        json: crate::body(vmbackup::contract::CompletionsBody {
            shell: shell.to_string(),
            script: script.clone(),
        }),
        text: script,
        code: exit::OK,
    })
}

/// The pages: `vmbackup.1`, then one per visible subcommand, nested ones too
/// (`vmbackup-schedule-add.1`), each with its name, text and bytes.
fn pages() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    fn walk(
        cmd: &clap::Command,
        name: &str,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> anyhow::Result<()> {
        let page = cmd.clone().name(name.to_string());
        let mut bytes = Vec::new();
        clap_mangen::Man::new(page).render(&mut bytes)?;
        out.push((format!("{name}.1"), bytes));
        // Not the hidden ones, nor clap's `help` (each page has its own help).
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            walk(sub, &format!("{name}-{}", sub.get_name()), out)?;
        }
        Ok(())
    }
    let mut cmd = Cli::command();
    cmd.build();
    let mut out = Vec::new();
    walk(&cmd, "vmbackup", &mut out)?;
    Ok(out)
}

pub fn cmd_man(dir: Option<&Path>) -> anyhow::Result<Output> {
    let pages = pages()?;
    let Some(dir) = dir else {
        let (_, main) = pages.into_iter().next().expect("the main page comes first");
        let text = String::from_utf8(main)?;
        return Ok(Output {
            json: crate::body(vmbackup::contract::ManBody {
                page: Some(text.clone()),
                written: None,
            }),
            text,
            code: exit::OK,
        });
    };
    if !dir.is_dir() {
        return Err(Error::Invalid(format!("--dir {}: not a folder", dir.display())).into());
    }
    let mut written = Vec::new();
    for (name, bytes) in &pages {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(Output {
        text: format!("wrote {} man pages to {}\n", written.len(), dir.display()),
        json: crate::body(vmbackup::contract::ManBody {
            page: None,
            written: Some(written),
        }),
        code: exit::OK,
    })
}
