//! The VM as data: name, UUID, vCPUs, memory, disks and vNICs, read from libvirt domain XML.
//! Reading only: the XML itself is never rebuilt from these structs (unknown elements would be
//! lost); edits are made on the original text.

use serde::{Deserialize, Serialize};

use super::xml_edit::XmlError;

type Result<T> = std::result::Result<T, XmlError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VmSpec {
    pub name: String,
    pub uuid: String,
    pub vcpus: u32,
    /// Memory in bytes (`<memory>`, the maximum the domain may have).
    pub memory_bytes: u64,
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
    /// Whether the domain has a `org.qemu.guest_agent.0` channel.
    pub agent_channel: bool,
    /// The NVRAM file of `<os><nvram>` (UEFI variables), when the domain names one.
    #[serde(default)]
    pub nvram: Option<String>,
    /// The domain's `<tpm>`, when it has one.
    #[serde(default)]
    pub tpm: Option<TpmSpec>,
}

/// A domain's `<tpm>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TpmSpec {
    /// `<tpm model=...>`: `tpm-crb`, `tpm-tis`, ...
    pub model: Option<String>,
    /// `<backend type=...>`: `emulator` (libvirt runs swtpm, with per-VM state),
    /// `passthrough` (the host's TPM) or `external` (a swtpm started by someone else).
    pub backend: String,
    /// `<backend version=...>`: `2.0` or `1.2`.
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DiskSpec {
    /// `<target dev=...>`, e.g. `vda`.
    pub target: String,
    /// `disk`, `cdrom`, `floppy` or `lun`.
    pub device: String,
    /// `file`, `block`, `network`, `volume`, `dir` or `nvme`.
    pub kind: String,
    /// The file or device path, when the disk has one.
    pub source: Option<String>,
    /// `<driver type=...>`: `qcow2`, `raw`, ...
    pub format: Option<String>,
    pub readonly: bool,
    pub shareable: bool,
    pub serial: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NicSpec {
    pub mac: Option<String>,
    pub model: Option<String>,
    /// `<interface type=...>`: `network`, `bridge`, `user`, `direct`, ...
    pub kind: String,
    /// The network or bridge name (or device for `direct`), when there is one.
    pub source: Option<String>,
}

fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

fn scaled(value: &str, unit: Option<&str>) -> Result<u64> {
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| XmlError(format!("bad number {value:?}")))?;
    let mult: u64 = match unit.unwrap_or("KiB") {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        other => return Err(XmlError(format!("unknown memory unit {other:?}"))),
    };
    n.checked_mul(mult)
        .ok_or_else(|| XmlError(format!("memory size {value} {mult} overflows")))
}

impl VmSpec {
    pub fn from_xml(xml: &str) -> Result<VmSpec> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
        let dom = doc.root_element();
        if !dom.has_tag_name("domain") {
            return Err(XmlError("root element is not <domain>".into()));
        }
        let text = |name: &str| child(dom, name).and_then(|n| n.text()).map(str::trim);
        let name = text("name")
            .ok_or_else(|| XmlError("no <name>".into()))?
            .to_string();
        let uuid = text("uuid").unwrap_or_default().to_string();
        let vcpus = match text("vcpu") {
            Some(v) => v
                .parse()
                .map_err(|_| XmlError(format!("bad <vcpu> {v:?}")))?,
            None => 1,
        };
        let memory_bytes = match child(dom, "memory") {
            Some(m) => scaled(m.text().unwrap_or("0"), m.attribute("unit"))?,
            None => 0,
        };

        // `<nvram>PATH</nvram>`, or (newer libvirt) `<nvram type='file'><source file=PATH/>`.
        let nvram = child(dom, "os")
            .and_then(|os| child(os, "nvram"))
            .and_then(|n| {
                n.text()
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .or_else(|| child(n, "source").and_then(|s| s.attribute("file")))
                    .map(str::to_string)
            });
        let mut tpm = None;
        let mut disks = Vec::new();
        let mut nics = Vec::new();
        let mut agent_channel = false;
        if let Some(devices) = child(dom, "devices") {
            for dev in devices.children().filter(|n| n.is_element()) {
                match dev.tag_name().name() {
                    "disk" => disks.push(parse_disk(dev)?),
                    "interface" => nics.push(parse_nic(dev)),
                    "tpm" if tpm.is_none() => {
                        let backend = child(dev, "backend");
                        tpm = Some(TpmSpec {
                            model: dev.attribute("model").map(str::to_string),
                            backend: backend
                                .and_then(|b| b.attribute("type"))
                                .unwrap_or("emulator")
                                .to_string(),
                            version: backend
                                .and_then(|b| b.attribute("version"))
                                .map(str::to_string),
                        });
                    }
                    "channel"
                        if child(dev, "target").and_then(|t| t.attribute("name"))
                            == Some("org.qemu.guest_agent.0") =>
                    {
                        agent_channel = true;
                    }
                    _ => {}
                }
            }
        }
        Ok(VmSpec {
            name,
            uuid,
            vcpus,
            memory_bytes,
            disks,
            nics,
            agent_channel,
            nvram,
            tpm,
        })
    }
}

fn parse_disk(dev: roxmltree::Node) -> Result<DiskSpec> {
    let target = child(dev, "target")
        .and_then(|t| t.attribute("dev"))
        .ok_or_else(|| XmlError("a <disk> has no <target dev>".into()))?
        .to_string();
    let source = child(dev, "source").and_then(|s| {
        s.attribute("file")
            .or_else(|| s.attribute("dev"))
            .or_else(|| s.attribute("dir"))
            .or_else(|| s.attribute("name"))
            .map(str::to_string)
    });
    Ok(DiskSpec {
        target,
        device: dev.attribute("device").unwrap_or("disk").to_string(),
        kind: dev.attribute("type").unwrap_or("file").to_string(),
        source,
        format: child(dev, "driver")
            .and_then(|d| d.attribute("type"))
            .map(str::to_string),
        readonly: child(dev, "readonly").is_some(),
        shareable: child(dev, "shareable").is_some(),
        serial: child(dev, "serial")
            .and_then(|s| s.text())
            .map(|s| s.trim().to_string()),
    })
}

fn parse_nic(dev: roxmltree::Node) -> NicSpec {
    let source = child(dev, "source").and_then(|s| {
        s.attribute("network")
            .or_else(|| s.attribute("bridge"))
            .or_else(|| s.attribute("dev"))
            .map(str::to_string)
    });
    NicSpec {
        mac: child(dev, "mac")
            .and_then(|m| m.attribute("address"))
            .map(|m| m.to_ascii_lowercase()),
        model: child(dev, "model")
            .and_then(|m| m.attribute("type"))
            .map(str::to_string),
        kind: dev.attribute("type").unwrap_or("").to_string(),
        source,
    }
}

/// A network interface as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GuestInterface {
    pub name: String,
    pub mac: Option<String>,
    /// Addresses with prefix, e.g. `192.0.2.10/24`.
    pub ips: Vec<String>,
}

impl GuestInterface {
    /// The interfaces of a `guest-network-get-interfaces` reply (loopback left out).
    pub fn from_agent_reply(reply: &serde_json::Value) -> Vec<GuestInterface> {
        let mut out = Vec::new();
        for i in reply.as_array().into_iter().flatten() {
            let name = i["name"].as_str().unwrap_or_default();
            if name == "lo" {
                continue;
            }
            let ips = i["ip-addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| {
                    Some(format!(
                        "{}/{}",
                        a["ip-address"].as_str()?,
                        a["prefix"].as_u64()?
                    ))
                })
                .collect();
            out.push(GuestInterface {
                name: name.to_string(),
                mac: i["hardware-address"].as_str().map(str::to_ascii_lowercase),
                ips,
            });
        }
        out
    }

    /// The addresses recorded for the vNIC with `mac` (link-local ones left out).
    pub fn ips_of(ifs: &[GuestInterface], mac: Option<&str>) -> Vec<String> {
        ifs.iter()
            .filter(|g| mac.is_some() && g.mac.as_deref() == mac)
            .flat_map(|g| g.ips.iter().filter(|ip| !ip.starts_with("fe80:")).cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = r#"<domain type='qemu'>
  <name>web01</name>
  <uuid>0b5c1c3e-8d2e-4a8f-9a55-2f7d1c0f9e11</uuid>
  <memory unit='MiB'>512</memory>
  <vcpu placement='static'>2</vcpu>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <serial>root</serial>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/data'/>
      <target dev='vdb' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:AB:CD:EF'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <interface type='user'>
      <mac address='52:54:00:00:00:02'/>
    </interface>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>"#;

    #[test]
    fn reads_cpu_memory_disks_and_nics() {
        let vm = VmSpec::from_xml(XML).unwrap();
        assert_eq!(vm.name, "web01");
        assert_eq!(vm.uuid, "0b5c1c3e-8d2e-4a8f-9a55-2f7d1c0f9e11");
        assert_eq!(vm.vcpus, 2);
        assert_eq!(vm.memory_bytes, 512 << 20);
        assert!(vm.agent_channel);
        assert_eq!(vm.disks.len(), 3);
        let vda = &vm.disks[0];
        assert_eq!(vda.target, "vda");
        assert_eq!(vda.format.as_deref(), Some("qcow2"));
        assert_eq!(
            vda.source.as_deref(),
            Some("/var/lib/libvirt/images/web01.qcow2")
        );
        assert_eq!(vda.serial.as_deref(), Some("root"));
        let vdb = &vm.disks[1];
        assert_eq!((vdb.kind.as_str(), vdb.shareable), ("block", true));
        assert_eq!(vdb.source.as_deref(), Some("/dev/vg/data"));
        let cd = &vm.disks[2];
        assert_eq!((cd.device.as_str(), cd.readonly), ("cdrom", true));
        assert_eq!(cd.source, None);
        assert_eq!(vm.nics.len(), 2);
        assert_eq!(vm.nics[0].mac.as_deref(), Some("52:54:00:ab:cd:ef"));
        assert_eq!(vm.nics[0].source.as_deref(), Some("default"));
        assert_eq!(vm.nics[0].model.as_deref(), Some("virtio"));
        assert_eq!(vm.nics[1].kind, "user");
    }

    #[test]
    fn reads_nvram_and_tpm() {
        let vm = VmSpec::from_xml(XML).unwrap();
        assert_eq!((vm.nvram, vm.tpm), (None, None));
        let xml = "<domain><name>u</name><os>\n<type machine='q35'>hvm</type>\n\
            <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>\n\
            <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>\n  /var/lib/libvirt/qemu/nvram/u_VARS.fd\n</nvram>\n\
            </os><devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>\n\
            </devices></domain>";
        let vm = VmSpec::from_xml(xml).unwrap();
        assert_eq!(
            vm.nvram.as_deref(),
            Some("/var/lib/libvirt/qemu/nvram/u_VARS.fd")
        );
        let tpm = vm.tpm.unwrap();
        assert_eq!(
            (
                tpm.model.as_deref(),
                tpm.backend.as_str(),
                tpm.version.as_deref()
            ),
            (Some("tpm-crb"), "emulator", Some("2.0"))
        );
        let xml = "<domain><name>u</name><os><nvram type='file'><source file='/n/u.fd'/></nvram>\
            </os><devices><tpm><backend type='passthrough'><device path='/dev/tpm0'/></backend>\
            </tpm></devices></domain>";
        let vm = VmSpec::from_xml(xml).unwrap();
        assert_eq!(vm.nvram.as_deref(), Some("/n/u.fd"));
        assert_eq!(vm.tpm.unwrap().backend, "passthrough");
    }

    #[test]
    fn memory_units_default_to_kib() {
        let xml = "<domain><name>a</name><memory>1048576</memory></domain>";
        assert_eq!(VmSpec::from_xml(xml).unwrap().memory_bytes, 1 << 30);
        let xml = "<domain><name>a</name><memory unit='GiB'>4000</memory></domain>";
        assert_eq!(VmSpec::from_xml(xml).unwrap().memory_bytes, 4000 << 30);
    }

    #[test]
    fn refuses_what_is_not_a_domain() {
        assert!(VmSpec::from_xml("<network/>").is_err());
        assert!(VmSpec::from_xml("<domain>").is_err());
        assert!(VmSpec::from_xml("<domain><memory>1</memory></domain>").is_err());
    }
}
