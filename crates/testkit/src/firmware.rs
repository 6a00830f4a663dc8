//! Guest-side helpers for the Debian guest's UEFI + TPM variant (`GuestKind::DebianUefiTpm`):
//! set and read a UEFI variable (efivarfs), create and list
//! persistent TPM 2.0 objects (`tpm2-tools` on `/dev/tpmrm0`). Everything runs through the
//! guest agent; names and values are checked here and passed as arguments, never spliced
//! into a shell script.

use std::time::Duration;

use vmbackup::guest_agent;

use crate::error::{Context as _, KitError, Result};
use crate::libvirt_vm::TestVm;

/// The vendor GUID of the tests' UEFI variables.
pub const TEST_VENDOR_GUID: &str = "5c3a7d2e-1b4f-4e8a-9d6c-7f0e2a9b4c11";

/// Test variables are told apart by name (letters and digits only).
fn check_var_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(KitError::Setup(format!(
            "UEFI variable name {name:?}: use 1 to 64 ASCII letters and digits"
        )));
    }
    Ok(())
}

/// Runs `program args...` in the guest (no shell), with `stdin`; fails unless it exits 0.
fn guest_run(vm: &TestVm, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>> {
    let out = guest_agent::exec(vm.dom(), program, args, stdin, Duration::from_secs(120))
        .ctx(format_args!("run {program} in {}", vm.name()))?;
    if out.exit_code != 0 {
        return Err(KitError::Command {
            program: format!("guest: {program} {}", args.join(" ")),
            detail: format!("exit code {}: {}", out.exit_code, out.stderr_text().trim()),
        });
    }
    Ok(out.stdout)
}

/// Whether the guest booted with UEFI (efivarfs mounted) and has a TPM device.
pub fn has_uefi_and_tpm(vm: &TestVm) -> Result<(bool, bool)> {
    let out = vm.exec_sh(
        "test -d /sys/firmware/efi/efivars && echo efi; test -c /dev/tpm0 && echo tpm; true",
    )?;
    let text = out.stdout_text();
    Ok((
        text.lines().any(|l| l == "efi"),
        text.lines().any(|l| l == "tpm"),
    ))
}

/// Sets the non-volatile UEFI variable `name` of `TEST_VENDOR_GUID` (attributes NV, BS, RT)
/// to `data` (at most 1024 bytes), through efivarfs: one write of the attributes and the
/// value, as the kernel requires.
pub fn set_uefi_var(vm: &TestVm, name: &str, data: &[u8]) -> Result<()> {
    check_var_name(name)?;
    if data.is_empty() || data.len() > 1024 {
        return Err(KitError::Setup(format!(
            "a test UEFI variable holds 1 to 1024 bytes, not {}",
            data.len()
        )));
    }
    let path = format!("/sys/firmware/efi/efivars/{name}-{TEST_VENDOR_GUID}");
    let mut bytes = 7u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(data);
    let of = format!("of={path}");
    // iflag=fullblock: one block, so one write(2), whatever the pipe hands over at a time.
    guest_run(
        vm,
        "/bin/dd",
        &[&of, "bs=2048", "count=1", "iflag=fullblock", "status=none"],
        Some(&bytes),
    )?;
    Ok(())
}

/// The value of UEFI variable `name` of `TEST_VENDOR_GUID`, read from efivarfs, or None
/// when the guest has no such variable.
pub fn uefi_var(vm: &TestVm, name: &str) -> Result<Option<Vec<u8>>> {
    check_var_name(name)?;
    let path = format!("/sys/firmware/efi/efivars/{name}-{TEST_VENDOR_GUID}");
    let out = guest_agent::exec(
        vm.dom(),
        "/bin/cat",
        &[&path],
        None,
        Duration::from_secs(60),
    )
    .ctx(format_args!("read {path} in {}", vm.name()))?;
    if out.exit_code != 0 {
        if out.stderr_text().contains("No such file") {
            return Ok(None);
        }
        return Err(KitError::Command {
            program: format!("guest: cat {path}"),
            detail: out.stderr_text(),
        });
    }
    // efivarfs files start with the variable's 4 attribute bytes.
    if out.stdout.len() < 4 {
        return Err(KitError::Command {
            program: format!("guest: cat {path}"),
            detail: format!("{} bytes, fewer than the attributes", out.stdout.len()),
        });
    }
    Ok(Some(out.stdout[4..].to_vec()))
}

/// The TCTI the tools use: the kernel's resource manager.
const TCTI: &str = "--tcti=device:/dev/tpmrm0";

/// Creates a primary ECC key in the owner hierarchy and makes it persistent at `handle`
/// (`0x81000000`..=`0x817FFFFF`, the owner's persistent range).
pub fn create_persistent_tpm_object(vm: &TestVm, handle: u32) -> Result<()> {
    if !(0x8100_0000..=0x817F_FFFF).contains(&handle) {
        return Err(KitError::Setup(format!(
            "TPM handle {handle:#x} is outside the owner's persistent range"
        )));
    }
    let ctx = format!("/run/vmb-tpm-{handle:08x}.ctx");
    guest_run(
        vm,
        "/usr/bin/tpm2_createprimary",
        &[TCTI, "-Q", "-C", "o", "-G", "ecc", "-c", &ctx],
        None,
    )?;
    let h = format!("{handle:#x}");
    let made = guest_run(
        vm,
        "/usr/bin/tpm2_evictcontrol",
        &[TCTI, "-Q", "-C", "o", "-c", &ctx, &h],
        None,
    );
    let _ = guest_run(vm, "/bin/rm", &["-f", &ctx], None);
    made.map(|_| ())
}

/// The persistent TPM handles the guest's TPM lists (`tpm2_getcap handles-persistent`).
pub fn persistent_tpm_handles(vm: &TestVm) -> Result<Vec<u32>> {
    let out = guest_run(
        vm,
        "/usr/bin/tpm2_getcap",
        &[TCTI, "handles-persistent"],
        None,
    )?;
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|h| {
            u32::from_str_radix(h.trim().trim_start_matches("0x"), 16).map_err(|_| {
                KitError::Command {
                    program: "guest: tpm2_getcap handles-persistent".into(),
                    detail: format!("not a handle: {h}"),
                }
            })
        })
        .collect()
}
