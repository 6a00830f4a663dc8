//! Job reports through real channels: `report test` against a real SMTP server on loopback
//! that requires STARTTLS and AUTH (aiosmtpd, self-signed certificate) and a plain relay, the
//! hook's JSON document and its timeout, and the reports of manual jobs (backup, restore,
//! delete) by the `on` policy.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use vmbackup_testkit::libvirt_vm::{Format, TestVmBuilder};
use vmbackup_testkit::smtp::{Smtp, PASSWORD, USER};

fn write_config(place: &Place, name: &str, text: &str) -> String {
    let p = place.dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn secret_file(place: &Place, name: &str, text: &str, mode: u32) -> String {
    let p = place.dir.path().join(name);
    std::fs::write(&p, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p.to_string_lossy().into_owned()
}

/// The `[report]` table for the secure server with this password file, and a hook that
/// appends each JSON document to `hook_out` (one a line).
fn secure_config(smtp: &Smtp, password_file: &str, hook_out: &Path, extra: &str) -> String {
    format!(
        "[report]\nsmtp = \"127.0.0.1:{}\"\ntls = \"starttls\"\nusername = \"{USER}\"\n\
         password_file = \"{password_file}\"\nca_file = \"{}\"\n\
         from = \"vmbackup@test.invalid\"\nto = [\"ops@test.invalid\", \"oncall@test.invalid\"]\n\
         command = [\"/bin/sh\", \"-c\", \"cat >> '{}'; echo >> '{}'\"]\n{extra}",
        smtp.port,
        smtp.ca_file.as_ref().unwrap().display(),
        hook_out.display(),
        hook_out.display(),
    )
}

fn hook_documents(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn channel<'a>(r: &'a Run, name: &str) -> &'a Value {
    r.json["channels"]
        .as_array()
        .unwrap_or_else(|| panic!("no channels: {}\n{}", r.json, r.stderr))
        .iter()
        .find(|c| c["channel"] == name)
        .unwrap_or_else(|| panic!("no {name} channel: {}", r.json))
}

#[test]
fn report_test_goes_through_starttls_and_auth_and_fails_loudly_when_a_channel_cannot() {
    let place = Place::new();
    let smtp = Smtp::start_secure();
    let hook_out = place.dir.path().join("hook.jsonl");

    // Nothing configured: bad input.
    let none = write_config(&place, "none.toml", "");
    let r = vmbackup(&place, &["--config", &none, "report", "test"]);
    assert_eq!(r.code, 2, "{}\n{}", r.json, r.stderr);
    assert!(r.stderr.contains("no report channel"), "{}", r.stderr);

    // STARTTLS, AUTH, a private CA: the mail and the hook both work.
    let good = secret_file(&place, "good", PASSWORD, 0o600);
    let cfg = write_config(
        &place,
        "good.toml",
        &secure_config(&smtp, &good, &hook_out, ""),
    );
    let t = Instant::now();
    let r = vmbackup(&place, &["--config", &cfg, "report", "test"]);
    assert_eq!(r.code, 0, "{}\n{}", r.json, r.stderr);
    assert_eq!(r.json["ok"], true);
    assert_eq!(channel(&r, "mail")["ok"], true, "{}", r.json);
    assert_eq!(channel(&r, "command")["ok"], true, "{}", r.json);
    assert!(!r.json.to_string().contains(PASSWORD));
    assert!(!r.stderr.contains(PASSWORD));
    smtp.wait_messages(1);
    let mail = smtp.texts().remove(0);
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert!(
        mail.contains(&format!("Subject: vmbackup test report from {host}")),
        "{mail}"
    );
    assert!(
        mail.contains("X-RcptTo: ops@test.invalid, oncall@test.invalid"),
        "{mail}"
    );
    assert!(mail.contains("X-MailFrom: vmbackup@test.invalid"), "{mail}");
    assert!(
        mail.contains("This is a test report from vmbackup"),
        "{mail}"
    );
    assert!(mail.contains("example-vm"), "{mail}");
    let docs = hook_documents(&hook_out);
    assert_eq!(docs.len(), 1, "{docs:?}");
    let d = &docs[0];
    assert_eq!(d["version"], 1);
    assert_eq!(d["kind"], "test");
    assert_eq!(d["status"], "ok");
    assert_eq!(d["host"], host.as_str());
    assert_eq!(d["subject"], format!("vmbackup test report from {host}"));
    assert_eq!(d["results"][0]["vm"], "example-vm");
    assert!(
        d["schedule"].is_null() && d["results"][0]["due"].is_null(),
        "{d}"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());

    // A wrong password: exit 1, the mail channel named with the server's refusal; the hook
    // still ran.
    let wrong = secret_file(&place, "wrong", "not the password", 0o600);
    let cfg = write_config(
        &place,
        "wrong.toml",
        &secure_config(&smtp, &wrong, &hook_out, ""),
    );
    let r = vmbackup(&place, &["--config", &cfg, "report", "test"]);
    assert_eq!(r.code, 1, "{}\n{}", r.json, r.stderr);
    let mail = channel(&r, "mail");
    assert_eq!(mail["ok"], false);
    let e = mail["error"].as_str().unwrap();
    assert!(
        e.contains("535") && e.contains(&format!("127.0.0.1:{}", smtp.port)),
        "{e}"
    );
    assert_eq!(channel(&r, "command")["ok"], true);
    assert!(
        !r.stderr.contains("not the password") && !r.json.to_string().contains("not the password")
    );
    let text = std::process::Command::new(binary())
        .args(["--config", &cfg, "report", "test"])
        .env("VMBACKUP_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.status.code(), Some(1));
    assert!(
        stdout.contains(&format!("mail (127.0.0.1:{} to ", smtp.port))
            && stdout.contains("FAILED: mail through"),
        "{stdout}"
    );

    // A password file others can read is refused, and the password is not shown.
    let open = secret_file(&place, "open", PASSWORD, 0o644);
    let cfg = write_config(
        &place,
        "open.toml",
        &secure_config(&smtp, &open, &hook_out, ""),
    );
    let r = vmbackup(&place, &["--config", &cfg, "report", "test"]);
    assert_eq!(r.code, 1, "{}\n{}", r.json, r.stderr);
    let e = channel(&r, "mail")["error"].as_str().unwrap().to_string();
    assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
    assert!(!r.json.to_string().contains(PASSWORD) && !r.stderr.contains(PASSWORD));

    // Without TLS the server refuses (it requires STARTTLS); without our CA the certificate
    // is not trusted.
    let plain = write_config(
        &place,
        "plain.toml",
        &format!(
            "[report]\nsmtp = \"127.0.0.1:{}\"\ntls = \"none\"\nto = [\"ops@test.invalid\"]\n",
            smtp.port
        ),
    );
    let r = vmbackup(&place, &["--config", &plain, "report", "test"]);
    assert_eq!(r.code, 1, "{}\n{}", r.json, r.stderr);
    let e = channel(&r, "mail")["error"].as_str().unwrap().to_string();
    assert!(e.to_lowercase().contains("starttls"), "{e}");
    let no_ca = write_config(
        &place,
        "no-ca.toml",
        &secure_config(&smtp, &good, &hook_out, "")
            .lines()
            .filter(|l| !l.starts_with("ca_file"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let r = vmbackup(&place, &["--config", &no_ca, "report", "test"]);
    assert_eq!(r.code, 1, "{}\n{}", r.json, r.stderr);
    let e = channel(&r, "mail")["error"].as_str().unwrap().to_string();
    assert!(
        e.contains("certificate") || e.contains("Certificate"),
        "{e}"
    );
    assert_eq!(smtp.messages().len(), 1, "no further mail was delivered");

    // A password in clear is refused as bad input.
    let clear = write_config(
        &place,
        "clear.toml",
        &format!(
            "[report]\nsmtp = \"127.0.0.1:25\"\ntls = \"none\"\nusername = \"u\"\n\
             password_file = \"{good}\"\nto = [\"ops@test.invalid\"]\n"
        ),
    );
    let r = vmbackup(&place, &["--config", &clear, "report", "test"]);
    assert_eq!(r.code, 2, "{}\n{}", r.json, r.stderr);
    assert!(r.stderr.contains("in clear"), "{}", r.stderr);
}

#[test]
fn a_plain_relay_still_works_and_a_hook_that_overruns_is_killed() {
    let place = Place::new();
    let relay = Smtp::start();
    let cfg = write_config(
        &place,
        "relay.toml",
        &format!(
            "[report]\nsmtp = \"127.0.0.1:{}\"\nfrom = \"vmbackup@test.invalid\"\n\
             to = [\"ops@test.invalid\"]\ncommand = [\"/bin/sleep\", \"30\"]\n\
             command_timeout_secs = 1\n",
            relay.port
        ),
    );
    let t = Instant::now();
    let r = vmbackup(&place, &["--config", &cfg, "report", "test"]);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(r.code, 1, "{}\n{}", r.json, r.stderr);
    assert_eq!(channel(&r, "mail")["ok"], true, "{}", r.json);
    let hook = channel(&r, "command");
    assert_eq!(hook["ok"], false);
    assert_eq!(hook["target"], "/bin/sleep");
    let e = hook["error"].as_str().unwrap();
    assert!(
        e.contains("/bin/sleep") && e.contains("1 s") && e.contains("killed"),
        "{e}"
    );
    let mails = relay.wait_messages(1);
    assert!(String::from_utf8_lossy(&mails[0]).contains("Subject: vmbackup test report from"));
}

#[test]
fn manual_backups_restores_and_deletes_send_reports_by_the_on_policy() {
    let vm = TestVmBuilder::new("rep-manual")
        .disk("vdb", Format::Qcow2, 16 * MIB)
        .define()
        .expect("VM defined");
    let place = Place::new();
    let relay = Smtp::start();
    let hook_out = place.dir.path().join("hook.jsonl");
    let config = |on: &str| {
        format!(
            "[report]\non = \"{on}\"\nsmtp = \"127.0.0.1:{}\"\nfrom = \"vmbackup@test.invalid\"\n\
             to = [\"ops@test.invalid\"]\n\
             command = [\"/bin/sh\", \"-c\", \"cat >> '{}'; echo >> '{}'\"]\n",
            relay.port,
            hook_out.display(),
            hook_out.display()
        )
    };
    let always = write_config(&place, "always.toml", &config("always"));
    let failure = write_config(&place, "failure.toml", &config("failure"));
    let never = write_config(&place, "never.toml", &config("never"));

    let b = vmbackup(&place, &["--config", &always, "backup", vm.name()]);
    ok(&b, "backup");
    let id = b.json["results"][0]["backup"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = vmbackup(&place, &["--config", &always, "restore", &id, "--force"]);
    ok(&r, "restore");
    // Bad input is not a job: no report.
    let bad = vmbackup(&place, &["--config", &always, "delete", "no-such-backup"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    // On failure only: a backup that works sends nothing; a delete that fails (its manifest
    // immutable) does.
    let b2 = vmbackup(&place, &["--config", &failure, "backup", vm.name()]);
    ok(&b2, "second backup");
    let id2 = b2.json["results"][0]["backup"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = place
        .repo()
        .join("backups")
        .join(&id2)
        .join("manifest.json");
    let chattr = |flag: &str| {
        let st = std::process::Command::new("chattr")
            .arg(flag)
            .arg(&manifest)
            .status()
            .unwrap();
        assert!(st.success());
    };
    chattr("+i");
    let failed = vmbackup(&place, &["--config", &failure, "delete", &id2]);
    chattr("-i");
    assert_eq!(failed.code, 1, "{}\n{}", failed.json, failed.stderr);
    let d = vmbackup(&place, &["--config", &never, "delete", &id2]);
    ok(&d, "delete, never reported");
    let d = vmbackup(&place, &["--config", &always, "delete", &id]);
    ok(&d, "delete");

    let docs = hook_documents(&hook_out);
    let kinds: Vec<(&str, &str)> = docs
        .iter()
        .map(|d| (d["kind"].as_str().unwrap(), d["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("backup", "ok"),
            ("restore", "ok"),
            ("delete", "failed"),
            ("delete", "ok")
        ],
        "{docs:#?}"
    );
    let backup = &docs[0]["results"][0];
    assert_eq!(backup["vm"], vm.name());
    assert_eq!(backup["backup_id"], id.as_str());
    assert_eq!(backup["status"], "ok");
    assert!(
        backup["consistency"].is_string() && backup["started_at"].is_string(),
        "{backup}"
    );
    assert_eq!(docs[1]["results"][0]["vm"], vm.name());
    assert_eq!(docs[1]["results"][0]["backup_id"], id.as_str());
    assert_eq!(docs[2]["results"][0]["vm"], vm.name());
    assert_eq!(docs[2]["results"][0]["backup_id"], id2.as_str());
    assert!(docs[2]["results"][0]["error"].is_string(), "{}", docs[2]);
    assert_eq!(docs[3]["results"][0]["backup_id"], id.as_str());

    relay.wait_messages(4);
    let mails = relay.texts();
    let subjects: std::collections::BTreeSet<String> = mails
        .iter()
        .filter_map(|m| {
            m.lines()
                .find(|l| l.starts_with("Subject: "))
                .map(str::to_string)
        })
        .collect();
    let want: std::collections::BTreeSet<String> = [
        "Subject: vmbackup backup: 1 ok, 0 failed",
        "Subject: vmbackup restore: 1 ok, 0 failed",
        "Subject: vmbackup delete: 0 ok, 1 failed",
        "Subject: vmbackup delete: 1 ok, 0 failed",
    ]
    .map(String::from)
    .into();
    assert_eq!(subjects, want, "{mails:#?}");
    assert_eq!(mails.len(), 4);
    let backup_mail = mails
        .iter()
        .find(|m| m.contains("Subject: vmbackup backup: 1 ok"))
        .unwrap();
    assert!(
        backup_mail.contains(&id) && backup_mail.contains(vm.name()),
        "{backup_mail}"
    );
}
