//! `vmbackup report test`: a sample report through every configured channel.

use vmbackup::config::Config;
use vmbackup::error::exit;
use vmbackup::notify;
use vmbackup::Error;

use crate::Output;

pub fn cmd_report_test(cfg: &Config) -> anyhow::Result<Output> {
    if !cfg.report.any() {
        return Err(Error::Invalid(
            "no report channel is configured: set smtp (and to) or command in the config \
             file's [report] table"
                .into(),
        )
        .into());
    }
    let channels = notify::test(&cfg.report);
    let ok = channels.iter().all(|c| c.ok);
    let mut text = String::new();
    for c in &channels {
        match &c.error {
            None => text.push_str(&format!("{} ({}): sent\n", c.channel, c.target)),
            Some(e) => text.push_str(&format!("{} ({}): FAILED: {e}\n", c.channel, c.target)),
        }
    }
    Ok(Output {
        json: crate::body(vmbackup::contract::ReportTestBody { channels }),
        text,
        code: if ok { exit::OK } else { exit::FAILED },
    })
}
