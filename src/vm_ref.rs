//! Which VM: a libvirt domain, or a plain QEMU VM reached through its QMP and guest-agent
//! sockets. Parsed once where a name enters (command line, schedules, stored manifests) and
//! used everywhere a VM is named. The text form of a plain QEMU VM, `qemu:NAME`, is spelled in
//! this module only.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::names::{check_component, NameError};

/// The prefix that marks a plain QEMU VM in the text form.
const QEMU_PREFIX: &str = "qemu:";

/// What sets a plain QEMU VM's lock file and backup ids apart from a libvirt domain's. `@` is
/// not allowed in VM names, so `web@qemu` is no libvirt domain's stem.
const QEMU_STEM_SUFFIX: &str = "@qemu";

/// A VM that vmbackup can back up.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VmRef {
    /// A domain of the libvirt connection.
    Libvirt(String),
    /// A plain QEMU VM: `NAME.qmp` and `NAME.qga` in the plain-QEMU socket folder.
    Qemu(String),
}

impl VmRef {
    /// A libvirt domain, its name checked.
    pub fn libvirt(name: &str) -> Result<VmRef, NameError> {
        Ok(VmRef::Libvirt(check_component(name)?.to_string()))
    }

    /// A plain QEMU VM, its name checked.
    pub fn qemu(name: &str) -> Result<VmRef, NameError> {
        Ok(VmRef::Qemu(check_component(name)?.to_string()))
    }

    /// The bare name: the libvirt domain's name, or the plain QEMU VM's socket name.
    pub fn name(&self) -> &str {
        match self {
            VmRef::Libvirt(n) | VmRef::Qemu(n) => n,
        }
    }

    pub fn is_qemu(&self) -> bool {
        matches!(self, VmRef::Qemu(_))
    }

    /// The file-name stem of this VM's lock and the start of its backup ids; never the same
    /// for two different VMs, whatever their kinds.
    pub fn stem(&self) -> String {
        match self {
            VmRef::Libvirt(n) => n.clone(),
            VmRef::Qemu(n) => format!("{n}{QEMU_STEM_SUFFIX}"),
        }
    }

    /// Whether the text `s` names this VM (an unparsable text names none).
    pub fn is(&self, s: &str) -> bool {
        s.parse::<VmRef>().is_ok_and(|v| &v == self)
    }
}

/// Whether `s` is a UUID in its usual text form (8-4-4-4-12 hexadecimal digits), as libvirt
/// prints a domain's.
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl fmt::Display for VmRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmRef::Libvirt(n) => f.write_str(n),
            VmRef::Qemu(n) => write!(f, "{QEMU_PREFIX}{n}"),
        }
    }
}

impl FromStr for VmRef {
    type Err = NameError;
    fn from_str(s: &str) -> Result<VmRef, NameError> {
        match s.strip_prefix(QEMU_PREFIX) {
            Some(name) => VmRef::qemu(name),
            None => VmRef::libvirt(s),
        }
    }
}

impl Serialize for VmRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// In JSON a VM reference is its string form: `NAME` or `qemu:NAME`.
impl schemars::JsonSchema for VmRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "VmRef".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "description": "a VM: NAME (libvirt) or qemu:NAME (plain QEMU)"})
    }
}

impl<'de> Deserialize<'de> for VmRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<VmRef, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_form_round_trips() {
        for s in ["web01", "qemu:web01", "db-2.prod"] {
            let v: VmRef = s.parse().unwrap();
            assert_eq!(v.to_string(), s);
            let j = serde_json::to_string(&v).unwrap();
            assert_eq!(serde_json::from_str::<VmRef>(&j).unwrap(), v);
        }
        assert_eq!(
            "qemu:web".parse::<VmRef>().unwrap(),
            VmRef::Qemu("web".into())
        );
        assert_eq!(
            "web".parse::<VmRef>().unwrap(),
            VmRef::Libvirt("web".into())
        );
    }

    #[test]
    fn bad_names_are_refused_in_both_kinds() {
        for s in [
            "",
            "qemu:",
            "qemu:../x",
            "a/b",
            "qemu:a b",
            "-x",
            "qemu:qemu:x",
        ] {
            assert!(s.parse::<VmRef>().is_err(), "{s:?} was accepted");
        }
    }

    #[test]
    fn uuids_are_told_from_names() {
        assert!(is_uuid("6f1c9a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"));
        assert!(is_uuid("6F1C9A2E-3B4D-4E5F-8A9B-0C1D2E3F4A5B"));
        for s in [
            "web01",
            "6f1c9a2e3b4d4e5f8a9b0c1d2e3f4a5b",
            "6f1c9a2e-3b4d-4e5f-8a9b-0c1d2e3f4a5g",
        ] {
            assert!(!is_uuid(s), "{s}");
        }
    }

    #[test]
    fn stems_of_the_two_kinds_never_collide() {
        // A libvirt domain named like a plain QEMU VM's stem is not a valid name.
        let q = VmRef::qemu("web").unwrap();
        assert_eq!(q.stem(), "web@qemu");
        assert!(VmRef::libvirt(&q.stem()).is_err());
        assert_ne!(VmRef::libvirt("qemu-web").unwrap().stem(), q.stem());
        assert_ne!(VmRef::libvirt("web").unwrap().stem(), q.stem());
        assert!(q.is("qemu:web") && !q.is("web"));
    }
}
