//! Targeted edits of domain XML: the bytes of the one attribute that changes are replaced and
//! everything else stays byte-identical (unknown elements, comments, formatting).

/// A domain XML that cannot be read or edited.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("domain XML: {0}")]
pub struct XmlError(pub String);

type Result<T> = std::result::Result<T, XmlError>;

/// Escapes text for an XML attribute value (either quote style) or element content.
pub fn escape_attr(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
        // Character references: a literal newline, tab or CR in an attribute would be read
        // back as a space (XML attribute-value normalisation).
        .replace('\n', "&#10;")
        .replace('\r', "&#13;")
        .replace('\t', "&#9;")
}

/// The `<source file=...>` of the file disk with `<target dev=target>`.
pub fn disk_source(xml: &str, target: &str) -> Result<Option<String>> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    Ok(find_disk(&doc, target)
        .and_then(|d| d.children().find(|c| c.has_tag_name("source")))
        .and_then(|s| s.attribute("file"))
        .map(str::to_string))
}

fn find_disk<'a, 'i>(
    doc: &'a roxmltree::Document<'i>,
    target: &str,
) -> Option<roxmltree::Node<'a, 'i>> {
    doc.descendants().find(|n| {
        n.has_tag_name("disk")
            && n.parent().is_some_and(|p| p.has_tag_name("devices"))
            && n.children()
                .any(|c| c.has_tag_name("target") && c.attribute("dev") == Some(target))
    })
}

/// Returns `xml` with the `<source file=...>` of disk `target` set to `path`.
pub fn set_disk_source(xml: &str, target: &str, path: &str) -> Result<String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    let disk =
        find_disk(&doc, target).ok_or_else(|| XmlError(format!("no disk with target {target}")))?;
    let source = disk
        .children()
        .find(|c| c.has_tag_name("source"))
        .ok_or_else(|| XmlError(format!("disk {target} has no <source>")))?;
    let attr = source
        .attributes()
        .find(|a| a.name() == "file")
        .ok_or_else(|| XmlError(format!("disk {target} has no source file")))?;
    let range = attr.range_value();
    let mut out = String::with_capacity(xml.len() + path.len());
    out.push_str(&xml[..range.start]);
    out.push_str(&escape_attr(path));
    out.push_str(&xml[range.end..]);
    Ok(out)
}

/// Returns `xml` with the text of the domain's `<name>` set to `name`.
pub fn set_name(xml: &str, name: &str) -> Result<String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    let node = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("name"))
        .ok_or_else(|| XmlError("no <name>".into()))?;
    let text = node
        .first_child()
        .filter(|t| t.is_text())
        .ok_or_else(|| XmlError("empty <name>".into()))?;
    let r = text.range();
    Ok(format!(
        "{}{}{}",
        &xml[..r.start],
        escape_attr(name),
        &xml[r.end..]
    ))
}

/// Returns `xml` without the elements that `pick` selects (for example the domain's `<uuid>`,
/// or the `<mac>` of every `<interface>`), each removed with its indentation.
pub fn remove_elements(xml: &str, pick: impl Fn(roxmltree::Node) -> bool) -> Result<String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    let mut ranges: Vec<std::ops::Range<usize>> = doc
        .descendants()
        .filter(|n| n.is_element() && pick(*n))
        .map(|n| {
            let r = n.range();
            // Take the whitespace before the element on its line too.
            let start = xml[..r.start].trim_end_matches([' ', '\t']).len();
            let start = if xml[..start].ends_with('\n') {
                start - 1
            } else {
                r.start
            };
            start..r.end
        })
        .collect();
    ranges.sort_by_key(|r| r.start);
    let mut out = String::with_capacity(xml.len());
    let mut at = 0;
    for r in ranges {
        if r.start < at {
            continue;
        }
        out.push_str(&xml[at..r.start]);
        at = r.end;
    }
    out.push_str(&xml[at..]);
    Ok(out)
}

/// Returns `xml` with the text of the domain's `<uuid>` set to `uuid`.
pub fn set_uuid(xml: &str, uuid: &str) -> Result<String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    let node = doc
        .root_element()
        .children()
        .find(|c| c.has_tag_name("uuid"))
        .ok_or_else(|| XmlError("no <uuid>".into()))?;
    let text = node
        .first_child()
        .filter(|t| t.is_text())
        .ok_or_else(|| XmlError("empty <uuid>".into()))?;
    let r = text.range();
    Ok(format!(
        "{}{}{}",
        &xml[..r.start],
        escape_attr(uuid),
        &xml[r.end..]
    ))
}

/// What a per-VM path of a domain is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// The UEFI variables (`<os><nvram>`).
    Nvram,
    /// A file a character device writes (`<serial type='file'>`, `<log file=...>`, ...).
    File,
    /// A named pipe of a `type='pipe'` character device.
    Pipe,
    /// A unix socket the VM listens on (`mode='bind'`, or a graphics `<listen type='socket'>`).
    Socket,
}

/// A path in a domain XML that belongs to that VM alone: two VMs given the same one cannot
/// run at the same time (or would write into each other's files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPath {
    /// Which element, e.g. `serial (file)` or `console log`.
    pub what: String,
    pub kind: PathKind,
    pub path: String,
    range: std::ops::Range<usize>,
}

/// Character devices, whose sources and logs may be per-VM files.
const CHARDEVS: [&str; 4] = ["serial", "console", "parallel", "channel"];

/// The per-VM paths of domain `xml`, and what in it cannot be given to a second VM: a host
/// device, a fixed TCP/UDP port the VM listens on, a fixed graphics port. Each refusal says
/// why.
pub fn per_vm_paths(xml: &str) -> Result<(Vec<VmPath>, Vec<String>)> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    let dom = doc.root_element();
    let mut paths = Vec::new();
    let mut refused = Vec::new();
    let attr_path = |n: roxmltree::Node, name: &str, what: String, kind: PathKind| {
        n.attributes().find(|a| a.name() == name).map(|a| VmPath {
            what,
            kind,
            path: a.value().to_string(),
            range: a.range_value(),
        })
    };
    if let Some(nv) = dom
        .children()
        .find(|c| c.has_tag_name("os"))
        .and_then(|os| os.children().find(|c| c.has_tag_name("nvram")))
    {
        let text = nv
            .first_child()
            .filter(|t| t.is_text() && !t.text().unwrap_or("").trim().is_empty());
        if let Some(t) = text {
            let raw = t.text().unwrap_or("");
            let lead = raw.len() - raw.trim_start().len();
            let start = t.range().start + lead;
            paths.push(VmPath {
                what: "nvram".into(),
                kind: PathKind::Nvram,
                path: raw.trim().to_string(),
                range: start..start + raw.trim().len(),
            });
        } else if let Some(p) = nv
            .children()
            .find(|c| c.has_tag_name("source"))
            .and_then(|s| attr_path(s, "file", "nvram".into(), PathKind::Nvram))
        {
            paths.push(p);
        }
    }
    let Some(devices) = dom.children().find(|c| c.has_tag_name("devices")) else {
        return Ok((paths, refused));
    };
    for dev in devices.children().filter(|n| n.is_element()) {
        let tag = dev.tag_name().name();
        if CHARDEVS.contains(&tag) {
            let ty = dev.attribute("type").unwrap_or("pty");
            // A console that mirrors serial 0 names the serial's file: the same path, which
            // maps to the same new one.
            let source = dev.children().find(|c| c.has_tag_name("source"));
            let what = format!("{tag} ({ty})");
            match (ty, source) {
                ("file", Some(s)) => paths.extend(attr_path(s, "path", what, PathKind::File)),
                ("pipe", Some(s)) => paths.extend(attr_path(s, "path", what, PathKind::Pipe)),
                ("unix", Some(s)) if s.attribute("mode") == Some("bind") => {
                    paths.extend(attr_path(s, "path", what, PathKind::Socket))
                }
                ("dev", Some(s)) => refused.push(format!(
                    "{tag} uses host device {}: a second VM cannot have it too",
                    s.attribute("path").unwrap_or("?")
                )),
                ("tcp" | "udp" | "telnet" | "tls", Some(_)) => {
                    for s in dev.children().filter(|c| c.has_tag_name("source")) {
                        if s.attribute("mode") == Some("bind") {
                            if let Some(port) = s.attribute("service") {
                                refused.push(format!(
                                    "{tag} listens on {ty} port {port}: a second VM cannot                                      listen on it too"
                                ));
                            }
                        }
                    }
                }
                _ => {}
            }
            for log in dev.children().filter(|c| c.has_tag_name("log")) {
                paths.extend(attr_path(log, "file", format!("{tag} log"), PathKind::File));
            }
        } else if tag == "graphics" {
            let ty = dev.attribute("type").unwrap_or("");
            let fixed = |a: &str| dev.attribute(a).is_some_and(|p| p != "-1" && p != "0");
            if dev.attribute("autoport") != Some("yes") && (fixed("port") || fixed("tlsPort")) {
                refused.push(format!(
                    "{ty} graphics has a fixed port ({}): a second VM cannot have it too",
                    dev.attribute("port")
                        .or(dev.attribute("tlsPort"))
                        .unwrap_or("?")
                ));
            }
            let what = format!("{ty} graphics socket");
            paths.extend(attr_path(dev, "socket", what.clone(), PathKind::Socket));
            for l in dev.children().filter(|c| c.has_tag_name("listen")) {
                if l.attribute("type") == Some("socket") {
                    paths.extend(attr_path(l, "socket", what.clone(), PathKind::Socket));
                }
            }
        }
    }
    Ok((paths, refused))
}

/// The path a copy named `new` gets for per-VM path `old` of VM `old_name`: in the same
/// folder, the file name with `old_name` replaced by `new`, or (when it does not contain
/// it) `new-` and the file name. `None` when `old` has no file name.
pub fn copy_path(old: &str, old_name: &str, new: &str) -> Option<String> {
    let p = std::path::Path::new(old);
    let file = p.file_name()?.to_str()?;
    let file = if !old_name.is_empty() && file.contains(old_name) {
        file.replace(old_name, new)
    } else {
        format!("{new}-{file}")
    };
    Some(p.with_file_name(file).to_string_lossy().into_owned())
}

/// Returns `xml` with each per-VM path in `paths` set to the path `new_path` gives for it.
pub fn set_paths(xml: &str, paths: &[VmPath], new_path: impl Fn(&VmPath) -> String) -> String {
    let mut edits: Vec<(std::ops::Range<usize>, String)> = paths
        .iter()
        .map(|p| (p.range.clone(), escape_attr(&new_path(p))))
        .collect();
    edits.sort_by_key(|(r, _)| r.start);
    let mut out = String::with_capacity(xml.len() + 256);
    let mut at = 0;
    for (r, v) in edits {
        if r.start < at {
            continue;
        }
        out.push_str(&xml[at..r.start]);
        out.push_str(&v);
        at = r.end;
    }
    out.push_str(&xml[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const XML: &str = "<domain type='kvm'>\n  <!-- keep me -->\n  <name>a</name>\n  <devices>\n    \
        <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'/>\n      \
        <source file='/img/a.qcow2' index='2'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n    \
        <disk type='file' device='disk'>\n      <source file=\"/img/b.qcow2\"/>\n      <target dev='vdb'/>\n    \
        </disk>\n    <unknown-element x='1'/>\n  </devices>\n</domain>\n";

    #[test]
    fn control_characters_in_a_path_survive_an_edit() {
        let odd = "/img/a\nb\tc\rd 'e\" <f> & g,h:i.qcow2";
        let out = set_disk_source(XML, "vdb", odd).unwrap();
        assert_eq!(disk_source(&out, "vdb").unwrap().as_deref(), Some(odd));
    }

    #[test]
    fn changes_only_the_source_of_the_named_disk() {
        let out = set_disk_source(XML, "vdb", "/new/b & c.qcow2").unwrap();
        assert_eq!(
            out,
            XML.replace("\"/img/b.qcow2\"", "\"/new/b &amp; c.qcow2\"")
        );
        assert_eq!(
            disk_source(&out, "vdb").unwrap().as_deref(),
            Some("/new/b & c.qcow2")
        );
        assert_eq!(
            disk_source(&out, "vda").unwrap().as_deref(),
            Some("/img/a.qcow2")
        );
    }

    #[test]
    fn renames_and_removes_uuid_and_macs_keeping_the_rest() {
        let xml = "<domain>\n  <name>old</name>\n  <uuid>1234</uuid>\n  <devices>\n    \
            <interface type='user'>\n      <mac address='52:54:00:00:00:01'/>\n      \
            <model type='virtio'/>\n    </interface>\n  </devices>\n</domain>\n";
        let out = set_name(xml, "new").unwrap();
        let out = remove_elements(&out, |n| {
            (n.has_tag_name("uuid") && n.parent().is_some_and(|p| p.has_tag_name("domain")))
                || (n.has_tag_name("mac")
                    && n.parent().is_some_and(|p| p.has_tag_name("interface")))
        })
        .unwrap();
        assert_eq!(
            out,
            "<domain>\n  <name>new</name>\n  <devices>\n    <interface type='user'>\n      \
             <model type='virtio'/>\n    </interface>\n  </devices>\n</domain>\n"
        );
        let spec = crate::hypervisor::vm::VmSpec::from_xml(&out).unwrap();
        assert_eq!((spec.name.as_str(), spec.uuid.as_str()), ("new", ""));
        assert_eq!(spec.nics[0].mac, None);
    }

    #[test]
    fn unknown_target_is_an_error() {
        assert!(set_disk_source(XML, "vdz", "/x").is_err());
        assert_eq!(disk_source(XML, "vdz").unwrap(), None);
    }

    /// A domain as `virsh dumpxml --inactive` gives it for a UEFI VM with a TPM, a
    /// file-backed serial console (mirrored by its console), logs and sockets.
    const UEFI: &str = r#"<domain type='kvm'>
  <name>web01</name>
  <uuid>0b5c1c3e-8d2e-4a8f-9a55-2f7d1c0f9e11</uuid>
  <memory unit='KiB'>2097152</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram>
    <boot dev='hd'/>
  </os>
  <features><acpi/><smm state='on'/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='/var/log/libvirt/qemu/web01-serial0.log'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
      <log file='/var/log/vm/web01/serial0-extra.log' append='on'/>
    </serial>
    <console type='file'>
      <source path='/var/log/libvirt/qemu/web01-serial0.log'/>
      <target type='serial' port='0'/>
    </console>
    <serial type='pty'>
      <log file='/srv/logs/console1.log'/>
      <target port='1'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web01.org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='unix'>
      <source mode='connect' path='/run/shared-service.sock'/>
      <target type='virtio' name='org.example.shared'/>
    </channel>
    <channel type='spicevmc'>
      <target type='virtio' name='com.redhat.spice.0'/>
    </channel>
    <tpm model='tpm-crb'>
      <backend type='emulator' version='2.0'/>
    </tpm>
    <graphics type='vnc' autoport='yes'>
      <listen type='socket' socket='/run/vnc/web01.sock'/>
    </graphics>
  </devices>
</domain>
"#;

    #[test]
    fn finds_every_per_vm_path_and_rewrites_them_for_a_copy() {
        let (paths, refused) = per_vm_paths(UEFI).unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        let found: Vec<(&str, PathKind)> =
            paths.iter().map(|p| (p.path.as_str(), p.kind)).collect();
        assert_eq!(
            found,
            [
                ("/var/lib/libvirt/qemu/nvram/web01_VARS.fd", PathKind::Nvram),
                ("/var/log/libvirt/qemu/web01-serial0.log", PathKind::File),
                ("/var/log/vm/web01/serial0-extra.log", PathKind::File),
                ("/var/log/libvirt/qemu/web01-serial0.log", PathKind::File),
                ("/srv/logs/console1.log", PathKind::File),
                (
                    "/var/lib/libvirt/qemu/channel/target/web01.org.qemu.guest_agent.0",
                    PathKind::Socket
                ),
                ("/run/vnc/web01.sock", PathKind::Socket),
            ]
        );
        let out = set_paths(UEFI, &paths, |p| {
            copy_path(&p.path, "web01", "web01-copy").unwrap()
        });
        let expected = UEFI
            .replace("nvram/web01_VARS.fd", "nvram/web01-copy_VARS.fd")
            .replace("web01-serial0.log", "web01-copy-serial0.log")
            .replace(
                "web01/serial0-extra.log",
                "web01/web01-copy-serial0-extra.log",
            )
            .replace(
                "/srv/logs/console1.log",
                "/srv/logs/web01-copy-console1.log",
            )
            .replace("target/web01.org", "target/web01-copy.org")
            .replace("vnc/web01.sock", "vnc/web01-copy.sock");
        assert_eq!(out, expected);
        // What is shared stays: the firmware, its template, the disk (restore sets it), a
        // socket the VM connects to.
        assert!(out.contains("OVMF_VARS_4M.ms.fd'>/var/lib/libvirt/qemu/nvram/web01-copy_VARS.fd<"));
        assert!(out.contains("/run/shared-service.sock"));
        assert!(out.contains("/var/lib/libvirt/images/web01.qcow2"));
        let spec = crate::hypervisor::vm::VmSpec::from_xml(&out).unwrap();
        assert_eq!(
            spec.nvram.as_deref(),
            Some("/var/lib/libvirt/qemu/nvram/web01-copy_VARS.fd")
        );
        let out = set_uuid(&out, "11111111-2222-4333-8444-555555555555").unwrap();
        assert_eq!(
            crate::hypervisor::vm::VmSpec::from_xml(&out).unwrap().uuid,
            "11111111-2222-4333-8444-555555555555"
        );
    }

    #[test]
    fn what_a_copy_cannot_have_is_named() {
        let xml = UEFI
            .replace(
                "<graphics type='vnc' autoport='yes'>",
                "<graphics type='vnc' port='5901' autoport='no'>",
            )
            .replace(
                "<serial type='pty'>",
                "<serial type='dev'>\n      <source path='/dev/ttyS1'/>",
            )
            .replace(
                "<channel type='spicevmc'>",
                "<channel type='tcp'>\n      <source mode='bind' host='0.0.0.0' service='4555'/>",
            );
        let (_, refused) = per_vm_paths(&xml).unwrap();
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(refused[0].contains("/dev/ttyS1"), "{refused:?}");
        assert!(refused[1].contains("4555"), "{refused:?}");
        assert!(refused[2].contains("5901"), "{refused:?}");
    }

    #[test]
    fn copy_paths_stay_in_their_folder() {
        assert_eq!(
            copy_path("/a/b/x.log", "vm", "new").as_deref(),
            Some("/a/b/new-x.log")
        );
        assert_eq!(
            copy_path("/a/vm/vm.log", "vm", "new").as_deref(),
            Some("/a/vm/new.log")
        );
        assert_eq!(copy_path("/", "vm", "new"), None);
    }
}
