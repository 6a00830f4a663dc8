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

/// The command line as `--help`, the man pages and the completions show it: the clap
/// definitions, with each command's exit codes after its help.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    for name in names {
        cmd = cmd.mut_subcommand(&name, |c| {
            let c = c.after_help(exit_codes(&name, None));
            let subs: Vec<String> = c
                .get_subcommands()
                .map(|s| s.get_name().to_string())
                .collect();
            subs.into_iter().fold(c, |c, sub| {
                let text = exit_codes(&name, Some(&sub));
                c.mut_subcommand(&sub, |s| s.after_help(text))
            })
        });
    }
    cmd
}

/// A command's exit codes, in words (DESIGN.md's contract, per command).
pub fn exit_codes(name: &str, sub: Option<&str>) -> String {
    let own: &[&str] = match (name, sub) {
        ("backup", _) => &[
            "3  refused by a pre-flight limit (sizes, overlay or repository space)",
            "4  busy: the VM or the repository is locked by another run",
            "5  partly done: some of several VMs failed (each is in the output)",
        ],
        ("check", _) => &["3  a check failed (the figures say which and why)"],
        ("restore", _) => &[
            "3  refused: the VM is running (use --power-off) or a pre-flight limit",
            "4  busy: a backup or restore of the VM runs",
        ],
        ("delete", _) => &[
            "3  refused: a backup is pinned (use --force); nothing deleted",
            "5  partly done: some deletions failed",
        ],
        ("verify", _) => &["1  a backup is damaged or cannot be read (each is reported)"],
        ("prune", _) => &[
            "4  busy: the repository is locked",
            "5  partly done: some deletions failed",
        ],
        ("gc", _) => &["4  busy: a backup is writing to the repository"],
        ("run-due", _) => &[
            "1  every due backup failed",
            "3  refused (for example a full slot)",
            "5  partly done: a backup, a boot test, a report or an interrupted run's recovery \
             failed beside others that worked",
        ],
        ("recover", _) => &["4  a VM is busy (a backup or restore runs) and was left alone"],
        ("boot-test", _) => &["1  the backup did not boot, or the command failed"],
        ("mount", _) | ("serve", _) => &["4  busy: a gc holds the repository"],
        ("umount", _) => &["4  busy: a file system is in use; nothing was unmounted"],
        ("schedule", Some("add" | "edit" | "enable")) => {
            &["3  refused: the slot is full (--slot auto picks the least loaded one)"]
        }
        ("sync", _) => &["4  busy: a gc runs on one of the repositories"],
        _ => &[],
    };
    let generic = [
        "0  done",
        "1  failed",
        "2  bad usage or input (unknown VM, backup or schedule; invalid value); nothing changed",
    ];
    let code = |l: &str| l.split_whitespace().next().unwrap_or_default().to_string();
    let mut lines: Vec<&str> = generic
        .iter()
        .copied()
        .filter(|g| !own.iter().any(|o| code(o) == code(g)))
        .chain(own.iter().copied())
        .collect();
    lines.sort_by_key(|l| code(l).parse::<u32>().unwrap_or(u32::MAX));
    let mut text = String::from("Exit codes:\n");
    for line in lines {
        text.push_str(&format!("  {line}\n"));
    }
    text.push_str("  130/143  interrupted by SIGINT/SIGTERM");
    text
}

pub fn cmd_completions(shell: clap_complete::Shell) -> anyhow::Result<Output> {
    let mut cmd = command();
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
    let mut cmd = command();
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
