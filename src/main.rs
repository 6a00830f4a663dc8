//! The `vmbackup` binary: parse the command line, call the library, print, and map errors to
//! the exit codes of the contract. With `--json`, stdout carries exactly one JSON document;
//! logs, warnings and progress go to stderr.

mod cli;
mod cli_config;
mod cli_docs;
mod cli_find;
mod cli_mount;
mod cli_report;
mod cli_restore;
mod cli_schedule;
mod cli_show;
mod cli_term;
mod cli_usage;

use cli_term::Progress;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use vmbackup::backup;
use vmbackup::config::{Config, FileConfig};
use vmbackup::contract;
use vmbackup::error::{chain, exit};
use vmbackup::hypervisor::libvirt::Libvirt;
use vmbackup::hypervisor::open::Hypervisors;
use vmbackup::settings::Quiesce;
use vmbackup::unlock::open_repo;
use vmbackup::vm_ref::VmRef;

/// Whether the command's one document (or its text) has been printed: the main thread and
/// an abandoning signal print it at most once between them.
static PRINTED: Mutex<bool> = Mutex::new(false);

/// SIGINT and SIGTERM (see `vmbackup::interrupt` for the contract):
/// - the first asks for a stop at the next safe point: the pipeline stops its copy at the next
///   chunk, thaws, commits the overlays back, discards what it did not publish, and the command
///   exits with 130 (SIGINT) or 143 (SIGTERM);
/// - a second one abandons the run at once: this thread waits only while a thaw is in progress
///   (the guest is never left frozen), prints the command's document (with `--json`: `ok`
///   false, `exit_code`, `error`, `interrupted`) and exits with the first signal's code. What
///   the run leaves (the VM on its overlays, unpublished objects) is in the journal, and
///   `recover` or the next run finishes it, as after a kill.
fn install_signal_thread(json: bool) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || loop {
        let Ok(sig) = set.wait() else { continue };
        if vmbackup::interrupt::received(sig as i32) {
            tracing::warn!(signal = %sig, "interrupted: stopping at the next safe point (thaw, commit back); interrupt again to abandon the run at once");
            continue;
        }
        tracing::warn!(signal = %sig, "interrupted again: abandoning the run (`vmbackup recover` or the next run finishes it)");
        while vmbackup::interrupt::thaw_pending() {
            std::thread::sleep(Duration::from_millis(20));
        }
        abandon(json);
    });
}

/// Ends the process for an abandoning signal, unless the command has printed its result.
fn abandon(json: bool) {
    let mut printed = PRINTED.lock().unwrap_or_else(|e| e.into_inner());
    if *printed {
        return;
    }
    let code = vmbackup::interrupt::exit_code();
    let msg = "interrupted twice: the run was abandoned; `vmbackup recover` (or the next run) \
               finishes what it left";
    if json {
        let e = contract::ErrorDoc::of_chain(
            [&vmbackup::Error::Interrupted as &(dyn std::error::Error + 'static)],
            msg.into(),
            code,
        );
        println!("{}", failed_document(code, e));
    }
    eprintln!("error: {msg}");
    let _ = std::io::stdout().flush();
    *printed = true;
    // No `Drop` runs: the repository locks this process holds go now, not when they are stale.
    vmbackup::repository::locks::release_all();
    vmbackup::serve::remove_socket_now();
    vmbackup::boot_test::cleanup_now();
    vmbackup::mount::cleanup_now();
    std::process::exit(code);
}

/// The first stop signal's name, `None` when none came.
fn signal_name() -> Option<String> {
    vmbackup::interrupt::signal().map(|n| match n {
        vmbackup::interrupt::SIGTERM => "SIGTERM".into(),
        vmbackup::interrupt::SIGINT => "SIGINT".into(),
        n => format!("signal {n}"),
    })
}

/// The command as typed (`list`, `schedule add`), for the documents' `command`.
static COMMAND: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The head every document starts with.
fn head(code: i32) -> contract::Head {
    contract::Head {
        schema_version: contract::SCHEMA_VERSION,
        command: COMMAND.get().cloned().unwrap_or_default(),
        ok: code == exit::OK,
        exit_code: code,
        interrupted: signal_name(),
    }
}

/// The document of a command that failed as a whole.
fn failed_document(code: i32, error: contract::ErrorDoc) -> Value {
    serde_json::to_value(contract::Failed {
        head: head(code),
        error,
    })
    .unwrap_or(Value::Null)
}

/// A command's body (one of `contract`'s types) as the value `Output` carries.
fn body<T: serde::Serialize>(b: T) -> Value {
    serde_json::to_value(b).unwrap_or(Value::Null)
}

/// What a command produced: the body of its JSON document (a `contract` type; `main` puts
/// the head before it), its text, and its exit code.
struct Output {
    json: Value,
    text: String,
    code: i32,
}

/// Writes the result to stdout. A reader that went away (`vmbackup list | head`) is not an
/// error worth a panic: what it did not read is dropped, as `ls | head` does.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write the result to stdout: {e}");
        }
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Records a manual job in the history; a history that cannot be written is a warning, not
/// a reason to refuse the job.
struct JobRecord {
    state: Option<vmbackup::state::State>,
    id: Option<i64>,
}

impl JobRecord {
    fn start(cfg: &Config, kind: &str, vm: Option<&str>) -> JobRecord {
        let state = match vmbackup::state::State::open(&cfg.state_dir) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("job history not recorded: {}", chain(&e));
                None
            }
        };
        let id = state.as_ref().and_then(|s| {
            s.start_job(&vmbackup::state::NewJob {
                kind,
                vm,
                ..Default::default()
            })
            .map_err(|e| tracing::warn!("job history not recorded: {}", chain(&e)))
            .ok()
        });
        JobRecord { state, id }
    }

    fn finish(&self, status: &str, backup_id: Option<&str>, error: Option<&str>) {
        if let (Some(s), Some(id)) = (&self.state, self.id) {
            if let Err(e) = s.finish_job(id, status, backup_id, error, None) {
                tracing::warn!("job history not recorded: {}", chain(&e));
            }
        }
    }

    fn finish_result<T>(&self, r: &anyhow::Result<T>, backup_id: Option<&str>) {
        match r {
            Ok(_) => self.finish("ok", backup_id, None),
            Err(e) if exit_code_of(e) == exit::BAD_INPUT => self.forget(),
            Err(e) => self.finish("failed", backup_id, Some(&format!("{e:#}"))),
        }
    }

    /// Bad input changes nothing, not even the history.
    fn forget(&self) {
        if let (Some(s), Some(id)) = (&self.state, self.id) {
            let _ = s.delete_job(id);
        }
    }
}

fn exit_code_of(e: &anyhow::Error) -> i32 {
    vmbackup::error::exit_code_in(e.chain())
}

fn cmd_init(cfg: &Config, encrypt: bool) -> anyhow::Result<Output> {
    let i = vmbackup::unlock::init(cfg, encrypt)?;
    let mut text = format!(
        "created {}repository {}\n",
        if i.encrypted { "encrypted " } else { "" },
        i.repo
    );
    if let Some(k) = &i.key_file {
        text.push_str(&format!(
            "its key is in {k}: keep a copy apart from the repository{}\n",
            if i.passphrase {
                ""
            } else {
                " (the only one: no passphrase opens it)"
            }
        ));
    }
    Ok(Output {
        json: body(contract::InitBody { init: i }),
        text,
        code: exit::OK,
    })
}

fn cmd_check(cfg: &Config, domains: &[String]) -> anyhow::Result<Output> {
    // libvirt is opened at the first libvirt VM: plain QEMU VMs are checked through QMP.
    let hv = Hypervisors::new(&cfg.connect, &cfg.qemu_dir);
    let mut reports = Vec::new();
    let mut text = String::new();
    let mut code = exit::OK;
    for name in domains {
        let report = hv.lookup(name).and_then(|vm| {
            hv.with_vm(&vm, |h| {
                backup::survey(h, cfg.repo.local(), &cfg.backup).map(|s| s.report)
            })
        });
        match report {
            Ok(r) => {
                text.push_str(&format!(
                    "{name}: {}\n",
                    if r.ok { "ok" } else { "REFUSED" }
                ));
                for c in &r.checks {
                    text.push_str(&format!(
                        "  [{}] {}\n",
                        if c.ok { " ok " } else { "FAIL" },
                        c.message
                    ));
                }
                for s in &r.skipped_disks {
                    text.push_str(&format!("  [skip] {}\n", s.reason));
                }
                if !r.ok && code == exit::OK {
                    code = exit::REFUSED;
                }
                reports.push(contract::CheckItem {
                    vm: name.clone(),
                    ok: r.ok,
                    report: Some(r),
                    error: None,
                });
            }
            Err(e) => {
                text.push_str(&format!("{name}: error: {}\n", chain(&e)));
                if code == exit::OK || code == exit::REFUSED {
                    code = e.exit_code();
                }
                reports.push(contract::CheckItem {
                    vm: name.clone(),
                    ok: false,
                    report: None,
                    error: Some(contract::ErrorDoc::of(&e)),
                });
            }
        }
    }
    Ok(Output {
        json: body(contract::CheckBody { vms: reports }),
        text,
        code,
    })
}

fn cmd_backup(
    cfg: &Config,
    domains: &[String],
    quiesce: cli::Quiesce,
    full: bool,
    tags: &[String],
    retry_lock: Option<Duration>,
) -> anyhow::Result<Output> {
    for t in tags {
        vmbackup::selector::check_tag(t)?;
    }
    let hv = Hypervisors::new(&cfg.connect, &cfg.qemu_dir);
    let repo = open_repo(cfg)?;
    let state = vmbackup::state::State::open(&cfg.state_dir)?;
    let mut opts = cfg.backup.clone();
    opts.quiesce = match quiesce {
        cli::Quiesce::Required => Quiesce::Required,
        cli::Quiesce::Preferred => Quiesce::Preferred,
        cli::Quiesce::Off => Quiesce::Off,
    };
    opts.full = full;
    opts.tags = tags.to_vec();
    let progress = Progress::new();
    let mut results = Vec::new();
    let mut text = String::new();
    let mut failures = Vec::new();
    let mut reported = Vec::new();
    for name in domains {
        let show = |l: &str, d: u64, t: u64| progress.show(l, d, t);
        let started = vmbackup::notify::now();
        // A UUID names the VM it finds (in the history too).
        let vm = hv.lookup(name);
        let named = vm.as_ref().map(|v| v.to_string()).ok();
        let job = JobRecord::start(cfg, "backup", Some(named.as_deref().unwrap_or(name)));
        let result = vm.and_then(|vm| {
            vmbackup::retry::retry_busy(retry_lock, vmbackup::Error::is_busy, || {
                hv.with_vm(&vm, |h| {
                    backup::backup(h, &repo, &cfg.state_dir, &state, &opts, &show)
                })
            })
        });
        match &result {
            Ok(o) => job.finish("ok", Some(&o.id), None),
            Err(e) if e.exit_code() == exit::BAD_INPUT => job.forget(),
            Err(e) if e.exit_code() == exit::BUSY => job.finish("skipped", None, Some(&chain(e))),
            Err(e) => job.finish("failed", None, Some(&chain(e))),
        }
        reported.extend(vmbackup::backup::report_result(name, &started, &result));
        match result {
            Ok(o) => {
                text.push_str(&format!(
                    "{}: backup {} ({} consistent{}), {} read, {} stored, {}\n",
                    o.vm,
                    o.id,
                    o.consistency,
                    o.freeze_ms
                        .map(|m| format!(", frozen {m} ms"))
                        .unwrap_or_default(),
                    human_bytes(o.bytes_read()),
                    human_bytes(o.stored_bytes),
                    vmbackup::render::duration_ms(o.duration_ms)
                ));
                results.push(contract::BackupItem {
                    vm: name.clone(),
                    ok: true,
                    backup: Some(o),
                    error: None,
                });
            }
            Err(e) => {
                tracing::error!(vm = %name, "backup failed: {}", chain(&e));
                text.push_str(&format!("{name}: FAILED: {}\n", chain(&e)));
                failures.push(e.exit_code());
                results.push(contract::BackupItem {
                    vm: name.clone(),
                    ok: false,
                    backup: None,
                    error: Some(contract::ErrorDoc::of(&e)),
                });
            }
        }
        if vmbackup::interrupt::requested() {
            break;
        }
    }
    vmbackup::notify::job_done(&cfg.report, vmbackup::notify::JobKind::Backup, reported);
    let code = match (failures.len(), domains.len()) {
        (0, _) => exit::OK,
        (1, 1) => failures[0],
        (f, n) if f < n => exit::PARTIAL,
        _ => failures[0],
    };
    let not_started: Vec<String> = domains[results.len()..].to_vec();
    if !not_started.is_empty() {
        text.push_str(&format!("not started: {}\n", not_started.join(", ")));
    }
    Ok(Output {
        json: body(contract::BackupBody {
            results,
            not_started,
        }),
        text,
        code,
    })
}

/// The last boot test of a backup, in words.
fn boot_test_words(t: Option<&vmbackup::repository::BootTestRecord>) -> String {
    let Some(t) = t else {
        return "none".into();
    };
    let mut w = if t.booted {
        format!(
            "{} booted, agent after {:.1} s",
            t.at,
            t.seconds_to_agent.unwrap_or_default()
        )
    } else {
        format!("{} did NOT boot", t.at)
    };
    if let Some(c) = &t.command {
        match t.command_exit_code {
            Some(x) => w.push_str(&format!(", command {c:?} exit {x}")),
            None => w.push_str(&format!(", command {c:?} did not end")),
        }
    }
    if let Some(e) = &t.error {
        w.push_str(&format!(" ({e})"));
    }
    w
}

fn cmd_show(cfg: &Config, id: &str) -> anyhow::Result<Output> {
    let repo = open_repo(cfg)?;
    let m = repo.load(id).map_err(vmbackup::Error::from)?;
    // What the backup holds besides disks, in words (old backups: none recorded).
    let state = vmbackup::vm_state::describe(&m);
    let boot = repo.boot_test(id).map_err(vmbackup::Error::from)?;
    let pinned = cfg.state_dir.join("state.db").exists()
        && vmbackup::state::State::open(&cfg.state_dir)
            .and_then(|s| s.pinned())
            .is_ok_and(|p| p.contains(id));
    let text = cli_show::manifest_text(&m, &state, &boot_test_words(boot.as_ref()));
    Ok(Output {
        text,
        json: body(contract::ShowBody {
            backup: contract::BackupRow::of(&m, pinned, boot.clone()),
            manifest: m,
            vm_state: state,
            boot_test: boot,
        }),
        code: exit::OK,
    })
}

/// How `restore --instant` and `recover` start `vmbackup serve`: this binary with the global
/// options given (the environment is inherited).
fn serve_command(g: &cli::Global) -> vmbackup::instant::ServeCommand {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut opt = |name: &str, v: Option<std::ffi::OsString>| {
        if let Some(v) = v {
            args.push(name.into());
            args.push(v);
        }
    };
    opt("--connect", g.connect.clone().map(Into::into));
    opt("--repo", g.repo.clone().map(Into::into));
    opt("--key-file", g.key_file.clone().map(Into::into));
    opt("--state-dir", g.state_dir.clone().map(Into::into));
    opt("--config", g.config.clone().map(Into::into));
    vmbackup::instant::ServeCommand {
        exe: std::env::current_exe().unwrap_or_else(|_| "vmbackup".into()),
        global_args: args,
    }
}

fn cmd_instant_restore(
    cfg: &Config,
    id: &str,
    opts: &vmbackup::restore::Options,
    serve: &vmbackup::instant::ServeCommand,
) -> anyhow::Result<Output> {
    let lv = Libvirt::open(&cfg.connect)?;
    let repo = open_repo(cfg)?;
    let progress = Progress::new();
    let r = vmbackup::instant::instant_restore(
        &lv,
        &repo,
        &cfg.state_dir,
        id,
        opts,
        serve,
        &|l, d, t| progress.show(l, d, t),
    )?;
    let mut text = format!(
        "restored {} onto {} ({}) instantly: the VM ran on the backup after {:.1} s, on its \
         own images after {:.1} s ({} copied); it is running\n",
        r.restore.id,
        r.restore.vm,
        r.restore.disks.join(", "),
        r.seconds_to_start,
        r.seconds_to_local,
        human_bytes(r.bytes)
    );
    for s in &r.restore.state {
        text.push_str(&format!("{s}\n"));
    }
    for s in &r.restore.reserved {
        text.push_str(&format!("DHCP reservation: {s}\n"));
    }
    for w in &r.restore.warnings {
        text.push_str(&format!("warning: {w}\n"));
    }
    Ok(Output {
        text,
        json: body(contract::RestoreBody {
            dry_run: false,
            restore: contract::Restore::Instant(r),
        }),
        code: exit::OK,
    })
}

/// The report's result of a command on `vm` (`restore`, `delete`); `None` for bad input,
/// which changed nothing and is not reported.
fn command_result<T>(
    vm: &str,
    backup_id: Option<&str>,
    r: &anyhow::Result<T>,
) -> Option<vmbackup::notify::VmResult> {
    use vmbackup::notify::VmResult;
    match r {
        Err(e) if exit_code_of(e) == exit::BAD_INPUT => None,
        Ok(_) => Some(VmResult::outcome::<String>(vm, backup_id, Ok(()))),
        Err(e) => Some(VmResult::outcome(vm, backup_id, Err(format!("{e:#}")))),
    }
}

/// The restore options the command line gives (the same for a restore and its dry run).
fn restore_options(
    cfg: &Config,
    power_off: bool,
    as_name: Option<&str>,
    new_macs: bool,
    force: bool,
) -> vmbackup::restore::Options {
    vmbackup::restore::Options {
        power_off,
        shutdown_timeout: Duration::from_secs(60),
        threads: cfg.backup.threads,
        as_name: as_name.map(str::to_string),
        new_macs,
        force,
    }
}

#[allow(clippy::too_many_arguments)]
fn cmd_restore(
    cfg: &Config,
    id: &str,
    power_off: bool,
    as_name: Option<&str>,
    new_macs: bool,
    instant: Option<&vmbackup::instant::ServeCommand>,
    force: bool,
    retry_lock: Option<Duration>,
) -> anyhow::Result<Output> {
    let opts = restore_options(cfg, power_off, as_name, new_macs, force);
    let busy = |e: &anyhow::Error| exit_code_of(e) == exit::BUSY;
    if let Some(serve) = instant {
        return vmbackup::retry::retry_busy(retry_lock, busy, || {
            cmd_instant_restore(cfg, id, &opts, serve)
        });
    }
    let lv = Libvirt::open(&cfg.connect)?;
    let repo = open_repo(cfg)?;
    let progress = Progress::new();
    let r = vmbackup::retry::retry_busy(retry_lock, vmbackup::Error::is_busy, || {
        vmbackup::restore::restore(&lv, &repo, &cfg.state_dir, id, &opts, &|l, d, t| {
            progress.show(l, d, t)
        })
    })?;
    let mut text = format!(
        "restored {} onto {} ({}); it is powered off\n",
        r.id,
        r.vm,
        r.disks.join(", ")
    );
    for s in &r.state {
        text.push_str(&format!("{s}\n"));
    }
    for s in &r.reserved {
        text.push_str(&format!("DHCP reservation: {s}\n"));
    }
    for w in &r.warnings {
        text.push_str(&format!("warning: {w}\n"));
    }
    Ok(Output {
        text,
        json: body(contract::RestoreBody {
            dry_run: false,
            restore: contract::Restore::Plain(r),
        }),
        code: exit::OK,
    })
}

fn cmd_serve(
    cfg: &Config,
    id: &str,
    disks: &[String],
    endpoint: vmbackup::serve::Endpoint,
    idle_timeout: Option<u64>,
    json: bool,
) -> anyhow::Result<Output> {
    if idle_timeout == Some(0) {
        return Err(vmbackup::Error::Invalid("--idle-timeout must be at least 1".into()).into());
    }
    let repo = open_repo(cfg)?;
    let opts = vmbackup::serve::Options {
        id: id.to_string(),
        disks: disks.to_vec(),
        endpoint,
        idle_timeout: idle_timeout.map(Duration::from_secs),
    };
    // What to connect to is printed (the command's one document) as soon as it listens.
    let ready = |s: &vmbackup::serve::Serving| {
        if json {
            let mut doc = body(contract::ServeBody { serve: s.clone() });
            with_head(&mut doc, exit::OK);
            println!("{doc}");
        } else {
            println!(
                "serving backup {} of {} read-only over NBD; SIGINT or SIGTERM stops it",
                s.backup, s.vm
            );
            for e in &s.exports {
                println!("{:<6} {:>10}  {}", e.name, human_bytes(e.size), e.uri);
            }
        }
        let _ = std::io::stdout().flush();
    };
    vmbackup::serve::serve(repo, &opts, &ready)?;
    Ok(Output {
        json: Value::Null,
        text: String::new(),
        code: exit::OK,
    })
}

fn cmd_boot_test(
    cfg: &Config,
    id: &str,
    timeout: u64,
    command: Option<&str>,
    screenshot: Option<std::path::PathBuf>,
) -> anyhow::Result<Output> {
    if timeout == 0 {
        return Err(vmbackup::Error::Invalid("--timeout must be at least 1".into()).into());
    }
    let repo = std::sync::Arc::new(open_repo(cfg)?);
    let opts = vmbackup::boot_test::Options {
        id: id.to_string(),
        timeout: Duration::from_secs(timeout),
        command: command.map(str::to_string),
        connect: cfg.connect.clone(),
        screenshot,
    };
    let t = vmbackup::boot_test::boot_test(repo.clone(), &opts)?;
    let at = jiff::Timestamp::now()
        .round(jiff::Unit::Second)?
        .to_string();
    if let Err(e) = repo.put_boot_test(&t.backup, &t.record(at)) {
        tracing::warn!(
            "the boot test was not recorded with the backup: {}",
            chain(&e)
        );
    }
    let mut text = if t.passed() {
        format!(
            "backup {} of {} boots: the guest agent answered after {:.1} s",
            t.backup,
            t.vm,
            t.seconds_to_agent.unwrap_or_default()
        )
    } else {
        format!(
            "backup {} of {} FAILED its boot test: {}",
            t.backup,
            t.vm,
            t.error.as_deref().unwrap_or("?")
        )
    };
    if let Some(name) =
        t.os.as_ref()
            .and_then(|o| o.get("pretty-name").or(o.get("name")))
            .and_then(Value::as_str)
    {
        text.push_str(&format!(" ({name})"));
    }
    text.push('\n');
    if let Some(s) = &t.screenshot {
        text.push_str(&format!(
            "screenshot: {} ({})\n",
            s.path,
            human_bytes(s.bytes)
        ));
    }
    if let Some(e) = &t.screenshot_error {
        text.push_str(&format!("no screenshot: {e}\n"));
    }
    if let Some(c) = &t.command {
        text.push_str(&format!(
            "command {:?}: {}\n",
            c.cmd,
            c.exit_code
                .map(|x| format!("exit {x}"))
                .unwrap_or_else(|| "did not end".into())
        ));
        if !c.stdout.is_empty() {
            text.push_str(&c.stdout);
            if !c.stdout.ends_with('\n') {
                text.push('\n');
            }
        }
    }
    let ok = t.passed();
    Ok(Output {
        json: body(contract::BootTestBody { boot_test: t }),
        text,
        code: if ok { exit::OK } else { exit::FAILED },
    })
}

/// Deletes backups `ids`: all checked first (an unknown id is exit 2, a pinned one without
/// `--force` exit 3, and nothing is deleted), then each deleted and recorded as a job; some
/// failing is exit 5, all failing exit 1.
fn cmd_delete(cfg: &Config, ids: &[String], force: bool, dry_run: bool) -> anyhow::Result<Output> {
    use vmbackup::repository::RepoError;
    let repo = open_repo(cfg)?;
    let mut unique: Vec<&String> = Vec::new();
    for id in ids {
        if !unique.contains(&id) {
            unique.push(id);
        }
    }
    // A backup whose manifest cannot be read is there (and can be deleted); only a missing
    // one is unknown.
    let mut vms = Vec::new();
    let mut unknown = Vec::new();
    for id in &unique {
        match repo.load(id) {
            Ok(m) => vms.push(Some(m.vm_name)),
            Err(RepoError::NotFound(_)) => unknown.push(id.as_str()),
            Err(RepoError::BadName(e)) => {
                return Err(vmbackup::Error::from(RepoError::BadName(e)).into())
            }
            Err(_) => vms.push(None),
        }
    }
    if !unknown.is_empty() {
        return Err(vmbackup::Error::Invalid(format!(
            "no backup {} (nothing deleted)",
            unknown.join(", ")
        ))
        .into());
    }
    let state = vmbackup::state::State::open(&cfg.state_dir).map_err(vmbackup::Error::from)?;
    let pinned = state.pinned().map_err(vmbackup::Error::from)?;
    let held: Vec<&str> = unique
        .iter()
        .filter(|id| pinned.contains(id.as_str()))
        .map(|id| id.as_str())
        .collect();
    if !held.is_empty() && !force {
        return Err(vmbackup::Error::RefusedState(format!(
            "{} pinned (vmbackup unpin ID, or delete --force); nothing deleted",
            if held.len() == 1 {
                format!("backup {} is", held[0])
            } else {
                format!("backups {} are", held.join(", "))
            }
        ))
        .into());
    }
    if dry_run {
        let would: Vec<&str> = unique.iter().map(|id| id.as_str()).collect();
        return Ok(Output {
            text: format!("would delete {} (dry run)\n", would.join(", ")),
            json: body(contract::DeletedBody {
                dry_run: true,
                deleted: would.iter().map(|s| s.to_string()).collect(),
                errors: vec![],
            }),
            code: exit::OK,
        });
    }
    let (mut deleted, mut errors, mut reported) = (Vec::new(), Vec::new(), Vec::new());
    let mut text = String::new();
    for (id, vm) in unique.iter().zip(&vms) {
        let job = JobRecord::start(cfg, "delete", vm.as_deref());
        let r = repo
            .delete(id)
            .map_err(vmbackup::Error::from)
            .with_context(|| format!("delete {id}"));
        job.finish_result(&r, Some(id));
        let vm_name = vm.as_deref().unwrap_or("-");
        reported.extend(command_result(vm_name, Some(id), &r));
        match r {
            Ok(()) => {
                if pinned.contains(id.as_str()) {
                    let _ = state.unpin(id);
                }
                text.push_str(&format!("deleted {id}\n"));
                deleted.push(id.to_string());
            }
            Err(e) => {
                text.push_str(&format!("cannot delete {id}: {e:#}\n"));
                errors.push(contract::ItemError {
                    id: Some(id.to_string()),
                    error: contract::ErrorDoc::of_chain(
                        e.chain(),
                        format!("{e:#}"),
                        exit_code_of(&e),
                    ),
                });
            }
        }
        if vmbackup::interrupt::requested() {
            break;
        }
    }
    if !deleted.is_empty() {
        text.push_str("(their chunks are freed by gc)\n");
    }
    vmbackup::notify::job_done(&cfg.report, vmbackup::notify::JobKind::Delete, reported);
    let code = match (deleted.is_empty(), errors.is_empty()) {
        (_, true) => exit::OK,
        (true, false) => exit::FAILED,
        (false, false) => exit::PARTIAL,
    };
    Ok(Output {
        json: body(contract::DeletedBody {
            dry_run: false,
            deleted,
            errors,
        }),
        text,
        code,
    })
}

fn cmd_verify(cfg: &Config, ids: &[String], metadata: bool) -> anyhow::Result<Output> {
    let repo = open_repo(cfg)?;
    if metadata {
        let results = repo.verify_metadata(ids).map_err(vmbackup::Error::from)?;
        return Ok(verified_output(results, true));
    }
    let all = ids.is_empty();
    let ids: Vec<String> = if all {
        let scan = repo.scan().map_err(vmbackup::Error::from)?;
        let unreadable = scan.unreadable.into_iter().map(|(id, _)| id);
        scan.backups
            .into_iter()
            .map(|m| m.id)
            .chain(unreadable)
            .collect()
    } else {
        ids.to_vec()
    };
    if !all {
        // Unknown ids are bad input, found before anything is read.
        let unknown: Vec<&str> = ids
            .iter()
            .filter(|id| {
                matches!(
                    repo.load(id),
                    Err(vmbackup::repository::RepoError::NotFound(_))
                )
            })
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(
                vmbackup::Error::Invalid(format!("no backup {}", unknown.join(", "))).into(),
            );
        }
    }
    let mut results = Vec::new();
    let progress = Progress::new();
    for id in &ids {
        let label = format!("verify {id}");
        match repo.verify_with(id, &mut |d, t| progress.show(&label, d, t)) {
            Ok(v) => results.push(v),
            // Deleted (a delete or prune elsewhere) since the listing: not ours to verify.
            Err(vmbackup::repository::RepoError::NotFound(_)) if all => continue,
            // One that cannot be checked (its manifest or an index does not read) is reported
            // with the others, which are all checked.
            Err(e) => results.push(vmbackup::repository::maintain::Verified {
                id: id.clone(),
                vm: String::new(),
                ok: false,
                chunks: 0,
                damaged: vec![chain(&e)],
            }),
        };
        if vmbackup::interrupt::requested() {
            break;
        }
    }
    Ok(verified_output(results, false))
}

/// What `verify` says of `results`: ok unless a backup is damaged (exit 1).
fn verified_output(
    results: Vec<vmbackup::repository::maintain::Verified>,
    metadata: bool,
) -> Output {
    let mut text = String::new();
    let checked = if metadata { "present" } else { "intact" };
    for v in &results {
        if v.ok {
            text.push_str(&format!("{}: ok ({} chunks {checked})\n", v.id, v.chunks));
        } else {
            text.push_str(&format!("{}: DAMAGED\n", v.id));
            for d in &v.damaged {
                text.push_str(&format!("  {d}\n"));
            }
        }
    }
    let ok = results.iter().all(|v| v.ok);
    Output {
        json: body(contract::VerifyBody {
            metadata_only: metadata,
            backups: results,
        }),
        text,
        code: if ok { exit::OK } else { exit::FAILED },
    }
}

/// `--since`: an RFC 3339 instant, or a date (its midnight, UTC).
fn parse_since(s: &str) -> Result<jiff::Timestamp, vmbackup::Error> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    s.parse::<jiff::civil::Date>()
        .ok()
        .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
        .map(|z| z.timestamp())
        .ok_or_else(|| {
            vmbackup::Error::Invalid(format!(
                "--since {s:?}: give an RFC 3339 time (2026-11-30T02:00:00Z) or a date (2026-11-30)"
            ))
        })
}

fn cmd_sync(
    cfg: &Config,
    [from, to]: [&str; 2],
    [from_key, to_key]: [Option<&std::path::Path>; 2],
    vm: Option<&str>,
    since: Option<&str>,
) -> anyhow::Result<Output> {
    use vmbackup::repository::sync::{sync, SyncError, SyncFilter};
    use vmbackup::unlock::unlock_other;
    let filter = SyncFilter {
        vm: vm.map(str::to_string),
        since: since.map(parse_since).transpose()?,
    };
    use vmbackup::repository::location::Location;
    use vmbackup::repository::Repository;
    let parse = |flag: &str, s: &str| {
        Location::parse(s).map_err(|e| vmbackup::Error::Invalid(format!("{flag} {s}: {e}")))
    };
    let (from_loc, to_loc) = (parse("--from", from)?, parse("--to", to)?);
    let same = match (from_loc.local(), to_loc.local()) {
        (Some(a), Some(b)) => std::fs::canonicalize(a)
            .ok()
            .is_some_and(|a| std::fs::canonicalize(b).ok() == Some(a)),
        _ => from_loc.to_string() == to_loc.to_string(),
    };
    if same {
        return Err(vmbackup::Error::Invalid(format!(
            "--from and --to are the same repository ({from})"
        ))
        .into());
    }
    if !Repository::is_repository_at(&from_loc, &cfg.s3).map_err(vmbackup::Error::from)? {
        return Err(vmbackup::Error::Invalid(format!(
            "--from {from}: not a vmbackup repository (no config.json)"
        ))
        .into());
    }
    let open = |loc: &Location, key: Option<&std::path::Path>| {
        Repository::open_location(loc, &cfg.s3, &cfg.state_dir, &unlock_other(cfg, loc, key))
            .map_err(vmbackup::Error::from)
    };
    let source = open(&from_loc, from_key)?;
    let target = open(&to_loc, to_key)?;
    let progress = |m: &vmbackup::repository::manifest::Manifest| {
        tracing::info!(backup = %m.id, vm = %m.vm_name, "copying");
    };
    let s = match sync(&source, &target, &filter, &progress) {
        Ok(s) => s,
        Err(SyncError::Busy(which)) => {
            return Err(
                vmbackup::Error::Busy(format!("a gc runs on the {which} repository")).into(),
            )
        }
        Err(SyncError::Repo(e)) => return Err(vmbackup::Error::from(e).into()),
        Err(e) => return Err(e.into()),
    };
    let mut text = String::new();
    for id in &s.copied {
        text.push_str(&format!("copied {id}\n"));
    }
    text.push_str(&format!(
        "{} backup(s) copied, {} there already; {} chunk(s) written ({}), {} there already\n",
        s.copied.len(),
        s.present.len(),
        s.chunks_copied,
        human_bytes(s.bytes_copied),
        s.chunks_present
    ));
    Ok(Output {
        json: body(contract::SyncBody { sync: s }),
        text,
        code: exit::OK,
    })
}

fn cmd_gc(cfg: &Config, dry_run: bool, retry_lock: Option<Duration>) -> anyhow::Result<Output> {
    let repo = open_repo(cfg)?;
    if dry_run {
        let c = repo.gc_dry_run().map_err(vmbackup::Error::from)?;
        return Ok(Output {
            text: format!(
                "would remove {} chunks ({}), keep {} (dry run)\n",
                c.removed_chunks,
                human_bytes(c.removed_bytes),
                c.kept_chunks
            ),
            json: body(contract::GcBody {
                dry_run: true,
                gc: c,
            }),
            code: exit::OK,
        });
    }
    let progress = Progress::new();
    let gc = || match repo.try_gc_with(&mut |d, t| progress.show("gc", d, t)) {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(holders)) => Err(vmbackup::Error::RepoLocked { holders }),
        Err(e) => Err(vmbackup::Error::from(e)),
    };
    match vmbackup::retry::retry_busy(retry_lock, vmbackup::Error::is_busy, gc) {
        Ok(c) => Ok(Output {
            text: format!(
                "removed {} chunks ({}), kept {}\n",
                c.removed_chunks,
                human_bytes(c.removed_bytes),
                c.kept_chunks
            ),
            json: body(contract::GcBody {
                dry_run: false,
                gc: c,
            }),
            code: exit::OK,
        }),
        Err(e) => Err(e.into()),
    }
}

fn cmd_recover(
    cfg: &Config,
    domains: &[String],
    serve: &vmbackup::instant::ServeCommand,
) -> anyhow::Result<Output> {
    let vms = domains
        .iter()
        .map(|d| d.parse::<VmRef>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(vmbackup::Error::from)?;
    let lv = Libvirt::open(&cfg.connect)?;
    vmbackup::recover::check_names(&lv, &cfg.qemu_dir, &vms)?;
    let repo = open_repo(cfg)?;
    let state = vmbackup::state::State::open(&cfg.state_dir).map_err(vmbackup::Error::from)?;
    // Interrupted instant restores first: their VMs end on their own images.
    let (instant, instant_errors) = vmbackup::instant::recover(&lv, &cfg.state_dir, serve, |vm| {
        vms.is_empty() || vms.iter().any(|v| v.name() == vm)
    });
    let mut r = vmbackup::recover::recover(
        &lv,
        &repo,
        &cfg.state_dir,
        &state,
        &cfg.qemu_dir,
        &vms,
        &cfg.backup,
    )?;
    r.instant_restores = instant;
    r.errors.extend(instant_errors);
    let mut text = String::new();
    for i in &r.instant_restores {
        text.push_str(&format!("instant restore of {i}\n"));
    }
    for i in &r.interrupted {
        text.push_str(&format!(
            "{}: backup {} was interrupted in its {} phase\n",
            i.vm, i.backup_id, i.phase
        ));
    }
    for d in &r.disks {
        text.push_str(&format!(
            "{} {}: committed {} back into {}\n",
            d.vm, d.disk, d.overlay, d.image
        ));
    }
    for t in &r.thawed {
        text.push_str(&format!("{t}: the guest was frozen: thawed\n"));
    }
    for o in &r.orphan_overlays {
        text.push_str(&format!(
            "removed {o}, an overlay an interrupted run made\n"
        ));
    }
    for b in &r.busy {
        text.push_str(&format!(
            "{b}: busy (a backup or restore runs), left alone\n"
        ));
    }
    for u in &r.unreachable {
        text.push_str(&format!("{u}: no QEMU answers on its socket, skipped\n"));
    }
    for e in &r.errors {
        text.push_str(&format!("error: {e}\n"));
    }
    for l in &r.restore_leftovers {
        text.push_str(&format!("interrupted restore: {l}\n"));
    }
    if r.removed_objects > 0 {
        text.push_str(&format!(
            "removed {} objects of unfinished backups\n",
            r.removed_objects
        ));
    }
    if text.is_empty() {
        text.push_str("nothing to recover\n");
    }
    let code = if !r.errors.is_empty() {
        exit::FAILED
    } else if !r.busy.is_empty() {
        exit::BUSY
    } else {
        exit::OK
    };
    Ok(Output {
        json: body(contract::RecoverBody { recover: r }),
        text,
        code,
    })
}

fn run(cli: cli::Cli) -> anyhow::Result<Output> {
    use cli::Command as C;
    // Before any configuration is read: a guard must thaw even when the config is broken.
    if let C::ThawGuard { qga, timeout } = &cli.command {
        let thawed = vmbackup::thaw_guard::watch(
            &mut std::io::stdin().lock(),
            qga,
            std::time::Duration::from_secs(*timeout),
        )?;
        return Ok(Output {
            json: body(contract::ThawGuardBody { thawed }),
            text: String::new(),
            code: exit::OK,
        });
    }
    // Made from the command definitions alone: no configuration needed.
    match &cli.command {
        C::Completions { shell } => return cli_docs::cmd_completions(*shell),
        C::Man { dir } => return cli_docs::cmd_man(dir.as_deref()),
        _ => {}
    }
    let file = FileConfig::load(cli.global.config.as_deref())?;
    let mut cfg = Config::resolve(cli.global.overrides(), file)?;
    tracing::debug!(repo = %cfg.repo, state_dir = %cfg.state_dir.display(), connect = %cfg.connect, "settings");
    // This binary guards the plain QEMU guests it freezes (see thaw_guard).
    cfg.backup.thaw_guard = std::env::current_exe().ok();
    vmbackup::locks::set_job(cli.command.job());
    match &cli.command {
        C::Init { encrypt } => cmd_init(&cfg, *encrypt),
        C::Check { domains } => cmd_check(&cfg, domains),
        C::Backup {
            domains,
            quiesce,
            full,
            tags,
            retry_lock,
        } => cmd_backup(&cfg, domains, *quiesce, *full, tags, *retry_lock),
        C::List { domain, filter } => cli_find::cmd_list(&cfg, domain.as_deref(), filter),
        C::Show { id } => {
            let id = &cli_find::resolve_id(&cfg, id)?;
            cmd_show(&cfg, id).with_context(|| format!("show {id}"))
        }
        C::Restore {
            id,
            as_name,
            power_off,
            new_macs,
            instant: _,
            force,
            dry_run: true,
            retry_lock,
        } => cli_restore::cmd_restore_dry_run(
            &cfg,
            &cli_find::resolve_id(&cfg, id)?,
            *power_off,
            as_name.as_deref(),
            *new_macs,
            *force,
            *retry_lock,
        )
        .with_context(|| format!("restore {id}")),
        C::Restore {
            id,
            as_name,
            power_off,
            new_macs,
            instant,
            force,
            dry_run: false,
            retry_lock,
        } => {
            let id = &cli_find::resolve_id(&cfg, id)?;
            let vm = as_name.clone().or_else(|| {
                open_repo(&cfg)
                    .ok()
                    .and_then(|r| r.load(id).ok())
                    .map(|m| m.vm_name)
            });
            let job = JobRecord::start(&cfg, "restore", vm.as_deref());
            let serve = instant.then(|| serve_command(&cli.global));
            let r = cmd_restore(
                &cfg,
                id,
                *power_off,
                as_name.as_deref(),
                *new_macs,
                serve.as_ref(),
                *force,
                *retry_lock,
            )
            .with_context(|| format!("restore {id}"));
            job.finish_result(&r, Some(id));
            let done = command_result(vm.as_deref().unwrap_or(id), Some(id), &r);
            vmbackup::notify::job_done(
                &cfg.report,
                vmbackup::notify::JobKind::Restore,
                done.into_iter().collect(),
            );
            r
        }
        C::Serve {
            id,
            disks,
            socket,
            port,
            idle_timeout,
        } => {
            let id = &cli_find::resolve_id(&cfg, id)?;
            let endpoint = match (socket, port) {
                (_, Some(p)) => vmbackup::serve::Endpoint::Tcp(*p),
                (Some(s), None) => vmbackup::serve::Endpoint::Unix(s.clone()),
                (None, None) => {
                    vmbackup::serve::Endpoint::Unix(vmbackup::serve::default_socket(&cfg.state_dir))
                }
            };
            if matches!(endpoint, vmbackup::serve::Endpoint::Unix(_)) && socket.is_none() {
                std::fs::create_dir_all(&cfg.state_dir)
                    .with_context(|| format!("create {}", cfg.state_dir.display()))?;
            }
            cmd_serve(&cfg, id, disks, endpoint, *idle_timeout, cli.global.json)
                .with_context(|| format!("serve {id}"))
        }
        C::BootTest {
            id,
            timeout,
            command,
            screenshot,
        } => {
            let id = &cli_find::resolve_id(&cfg, id)?;
            let vm = open_repo(&cfg)
                .ok()
                .and_then(|r| r.load(id).ok())
                .map(|m| m.vm_name);
            let job = JobRecord::start(&cfg, "boot-test", vm.as_deref());
            let r = cmd_boot_test(&cfg, id, *timeout, command.as_deref(), screenshot.clone())
                .with_context(|| format!("boot-test {id}"));
            match &r {
                Ok(o) if o.code != exit::OK => {
                    job.finish("failed", Some(id), o.json["boot_test"]["error"].as_str())
                }
                r => job.finish_result(r, Some(id)),
            }
            r
        }
        C::Mount { id, dir, disks } => {
            let id = &cli_find::resolve_id(&cfg, id)?;
            cli_mount::cmd_mount(&cfg, cli.global.config.as_deref(), id, dir, disks)
                .with_context(|| format!("mount {id}"))
        }
        C::Umount { dir } => {
            cli_mount::cmd_umount(&cfg, dir).with_context(|| format!("umount {}", dir.display()))
        }
        C::MountDaemon { id, at, disks } => cli_mount::cmd_mount_daemon(&cfg, id, at, disks),
        C::Delete {
            ids,
            force,
            dry_run,
        } => cmd_delete(&cfg, &cli_find::resolve_ids(&cfg, ids)?, *force, *dry_run),
        C::Verify { ids, metadata } => {
            cmd_verify(&cfg, &cli_find::resolve_ids(&cfg, ids)?, *metadata)
        }
        C::Gc {
            dry_run,
            retry_lock,
        } => cmd_gc(&cfg, *dry_run, *retry_lock),
        // Answered before the configuration is read.
        C::Completions { shell } => cli_docs::cmd_completions(*shell),
        C::Man { dir } => cli_docs::cmd_man(dir.as_deref()),
        C::Usage { vm, from, to } => {
            cli_usage::cmd_usage(&cfg, vm.as_deref(), from.as_deref(), to.as_deref())
        }
        C::Sync {
            from,
            to,
            vm,
            since,
            from_key_file,
            to_key_file,
        } => cmd_sync(
            &cfg,
            [from, to],
            [from_key_file.as_deref(), to_key_file.as_deref()],
            vm.as_deref(),
            since.as_deref(),
        ),
        C::Prune {
            dry_run,
            vm,
            retry_lock,
        } => vmbackup::retry::retry_busy(
            *retry_lock,
            |e: &anyhow::Error| exit_code_of(e) == exit::BUSY,
            || cli_schedule::cmd_prune(&cfg, *dry_run, vm),
        ),
        C::Recover { domains } => cmd_recover(&cfg, domains, &serve_command(&cli.global)),
        C::ThawGuard { .. } => unreachable!("handled before the configuration is read"),
        C::Schedule(c) => cli_schedule::cmd_schedule(&cfg, c),
        C::Config(cli::ConfigCommand::Show) => {
            cli_config::cmd_config_show(&cfg, cli.global.config.as_deref())
        }
        C::Report(cli::ReportCommand::Test) => cli_report::cmd_report_test(&cfg),
        C::RunDue { now, dry_run } => cli_schedule::cmd_run_due(&cfg, now.as_deref(), *dry_run),
        C::History {
            days,
            all,
            vm,
            filter,
        } => cli_schedule::cmd_history(&cfg, &filter.query(*days, *all, vm.as_deref())),
        C::Pin { id } => cli_schedule::cmd_pin(&cfg, &cli_find::resolve_id(&cfg, id)?, true),
        C::Unpin { id } => cli_schedule::cmd_pin(&cfg, &cli_find::resolve_id(&cfg, id)?, false),
    }
}

/// Puts the head (`schema_version`, `command`, `ok`, `exit_code`, `interrupted`) before a
/// command's body.
fn with_head(doc: &mut Value, code: i32) {
    let mut head = match serde_json::to_value(head(code)) {
        Ok(Value::Object(h)) => h,
        _ => return,
    };
    if let Value::Object(b) = std::mem::take(doc) {
        head.extend(b);
    }
    *doc = Value::Object(head);
}

/// The command's name as typed, from the parsed arguments: `list`, `schedule add`.
fn command_name(m: &clap::ArgMatches) -> String {
    let mut words = Vec::new();
    let mut m = m;
    while let Some((name, sub)) = m.subcommand() {
        words.push(name.to_string());
        m = sub;
    }
    words.join(" ")
}

fn main() -> ExitCode {
    use clap::FromArgMatches;
    let parsed = cli_docs::command()
        .try_get_matches()
        .and_then(|m| cli::Cli::from_arg_matches(&m).map(|c| (c, command_name(&m))));
    let cli = match parsed {
        Ok((c, name)) => {
            let _ = COMMAND.set(name);
            c
        }
        Err(e) => {
            let code = if e.use_stderr() {
                exit::BAD_INPUT
            } else {
                exit::OK
            };
            let _ = e.print();
            let json = std::env::args().any(|a| a == "--json")
                || std::env::var("VMBACKUP_JSON").is_ok_and(|v| v == "true" || v == "1");
            if json && code != exit::OK {
                // clap's whole message (what is wrong, the usage, the hint), without colour.
                let msg = e.render().to_string().trim_end().to_string();
                println!("{}", failed_document(code, contract::ErrorDoc::usage(msg)));
            }
            return ExitCode::from(code as u8);
        }
    };
    cli_term::init(cli.global.quiet, cli.global.verbose, cli.global.json);
    if let Err(e) = vmbackup::fault::check_environment() {
        eprintln!("error: {e}");
        return ExitCode::from(70);
    }
    let json = cli.global.json;
    install_signal_thread(json);
    let result = run(cli);
    // Hold the output: an abandoning signal does not print a second document meanwhile.
    let mut printed = PRINTED.lock().unwrap_or_else(|e| e.into_inner());
    *printed = true;
    // A command a stop signal reached exits with its code (130, 143), whatever it finished;
    // its document says what it did.
    let interrupted = vmbackup::interrupt::requested();
    match result {
        Ok(mut out) => {
            if interrupted {
                out.code = vmbackup::interrupt::exit_code();
            }
            if json {
                if !out.json.is_null() {
                    with_head(&mut out.json, out.code);
                    emit(&format!("{}\n", out.json));
                }
            } else {
                emit(&out.text);
            }
            ExitCode::from(out.code as u8)
        }
        Err(e) => {
            let code = if interrupted {
                vmbackup::interrupt::exit_code()
            } else {
                exit_code_of(&e)
            };
            if json {
                let doc = contract::ErrorDoc::of_chain(e.chain(), format!("{e:#}"), code);
                emit(&format!("{}\n", failed_document(code, doc)));
            }
            eprintln!("error: {e:#}");
            ExitCode::from(code as u8)
        }
    }
}
