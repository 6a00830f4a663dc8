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
}
