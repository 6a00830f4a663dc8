//! libvirt through the `virt` crate. Every call here blocks: async callers run them on
//! blocking threads. The calls the crate does not wrap (FS freeze and thaw, agent response
//! timeout, block jobs, checkpoints) live in the private `raw` module, the only place with
//! `unsafe`.

use std::time::Duration;

use serde_json::Value;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

/// What a libvirt call or a guest-agent command through libvirt can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot connect to libvirt at {uri}")]
    Connect {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("no domain named {0:?}")]
    NoDomain(String),
    #[error("{op} failed for domain {domain}")]
    Libvirt {
        op: &'static str,
        domain: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("the guest agent of {domain} does not answer")]
    AgentUnavailable {
        domain: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("guest agent command {command} of {domain} failed")]
    Agent {
        domain: String,
        command: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("unexpected guest agent reply to {command}: {detail}")]
    AgentReply { command: String, detail: String },
    #[error("timed out after {secs:.1}s waiting for {what}")]
    Timeout { what: String, secs: f64 },
    #[error(transparent)]
    Xml(#[from] super::xml_edit::XmlError),
}

use LibvirtError as Error;
pub type Result<T, E = LibvirtError> = std::result::Result<T, E>;

/// The domain that `op` (define, create) made, with its name.
fn new_dom(op: &'static str, made: std::result::Result<Domain, virt::error::Error>) -> Result<Dom> {
    let domain = || String::from("(new)");
    let dom = made.map_err(|source| Error::Libvirt {
        op,
        domain: domain(),
        source,
    })?;
    let name = dom.name().map_err(|source| Error::Libvirt {
        op: "name",
        domain: domain(),
        source,
    })?;
    Ok(Dom { dom, name })
}

/// An open connection to libvirt.
pub struct Libvirt {
    conn: Connect,
    uri: String,
}

impl Libvirt {
    /// Opens `uri` (for example `qemu:///system`). libvirt's own printing of every error to
    /// stderr is switched off: errors reach the caller as values.
    pub fn open(uri: &str) -> Result<Self> {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|source| Error::Connect {
            uri: uri.to_string(),
            source,
        })?;
        Ok(Libvirt {
            conn,
            uri: uri.to_string(),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Looks a domain up by name; a missing domain is `Error::NoDomain`.
    pub fn domain(&self, name: &str) -> Result<Dom> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Dom {
                dom,
                name: name.to_string(),
            }),
            Err(e) if e.code().is(ErrorNumber::NoDomain) => Err(Error::NoDomain(name.to_string())),
            Err(source) => Err(Error::Libvirt {
                op: "lookup",
                domain: name.to_string(),
                source,
            }),
        }
    }

    /// Like `domain`, but `None` when there is no such domain.
    pub fn find_domain(&self, name: &str) -> Result<Option<Dom>> {
        match self.domain(name) {
            Ok(d) => Ok(Some(d)),
            Err(Error::NoDomain(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The domain with UUID `uuid`, or `None` when there is none.
    pub fn find_domain_by_uuid(&self, uuid: &str) -> Result<Option<Dom>> {
        let err = |source| Error::Libvirt {
            op: "lookup by UUID",
            domain: uuid.to_string(),
            source,
        };
        let dom = match self.conn.lookup_domain_by_uuid_string(uuid) {
            Ok(d) => d,
            Err(e) if e.code().is(ErrorNumber::NoDomain) => return Ok(None),
            Err(e) => return Err(err(e)),
        };
        let name = dom.name().map_err(err)?;
        Ok(Some(Dom { dom, name }))
    }

    /// Defines (or redefines) a persistent domain from XML.
    pub fn define(&self, xml: &str) -> Result<Dom> {
        new_dom("define", self.conn.define_domain_xml(xml))
    }

    /// Creates and starts a transient domain from XML: it is gone once destroyed.
    pub fn create_transient(&self, xml: &str) -> Result<Dom> {
        new_dom("create", self.conn.create_domain_xml(xml, 0))
    }

    /// A screenshot of the first screen of running domain `dom` (libvirt's stream of QEMU's
    /// `screendump`), whole in memory, and its MIME type (`image/png` from QEMU 7.1 on).
    pub fn screenshot(&self, dom: &Dom) -> Result<(Vec<u8>, String)> {
        let err = |op| {
            let domain = dom.name.clone();
            move |source| Error::Libvirt { op, domain, source }
        };
        let stream = virt::stream::Stream::new(&self.conn, 0).map_err(err("screenshot"))?;
        let mime = dom
            .dom
            .screenshot(&stream, 0, 0)
            .map_err(err("screenshot"))?;
        let mut image = Vec::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match stream.recv(&mut buf) {
                Ok(0) => break,
                Ok(n) => image.extend_from_slice(&buf[..n as usize]),
                Err(e) => {
                    let _ = stream.abort();
                    return Err(err("screenshot")(e));
                }
            }
        }
        stream.finish().map_err(err("screenshot"))?;
        Ok((image, mime))
    }

    /// A libvirt network's XML and whether it is active; `None` when there is no such network.
    pub fn network_xml(&self, name: &str) -> Result<Option<(String, bool)>> {
        let err = |op, source| Error::Libvirt {
            op,
            domain: format!("network {name}"),
            source,
        };
        let net = match self.conn.lookup_network_by_name(name) {
            Ok(n) => n,
            Err(e) if e.code().is(ErrorNumber::NoNetwork) => return Ok(None),
            Err(e) => return Err(err("network lookup", e)),
        };
        let xml = net
            .xml_desc(sys::VIR_NETWORK_XML_INACTIVE)
            .map_err(|e| err("network XML", e))?;
        let active = net.is_active().map_err(|e| err("network state", e))?;
        Ok(Some((xml, active)))
    }

    /// Adds (`add`) or removes a `<host>` of the DHCP section of network `name`'s
    /// `ip_index`-th `<ip>`, in its persistent definition and, when it runs, live.
    pub fn network_dhcp_host(
        &self,
        name: &str,
        add: bool,
        ip_index: usize,
        host_xml: &str,
        live: bool,
    ) -> Result<()> {
        let err = |op, source| Error::Libvirt {
            op,
            domain: format!("network {name}"),
            source,
        };
        let net = self
            .conn
            .lookup_network_by_name(name)
            .map_err(|e| err("network lookup", e))?;
        let cmd = if add {
            sys::VIR_NETWORK_UPDATE_COMMAND_ADD_LAST
        } else {
            sys::VIR_NETWORK_UPDATE_COMMAND_DELETE
        };
        let mut flags = sys::VIR_NETWORK_UPDATE_AFFECT_CONFIG;
        if live {
            flags |= sys::VIR_NETWORK_UPDATE_AFFECT_LIVE;
        }
        net.update(
            cmd,
            sys::VIR_NETWORK_SECTION_IP_DHCP_HOST,
            ip_index as i32,
            host_xml,
            flags,
        )
        .map_err(|e| err("network update", e))
    }

    /// Defines and starts a persistent network from XML.
    pub fn define_network(&self, xml: &str) -> Result<()> {
        let err = |op, source| Error::Libvirt {
            op,
            domain: "network (new)".into(),
            source,
        };
        let net = self
            .conn
            .define_network_xml(xml)
            .map_err(|e| err("network define", e))?;
        if let Err(e) = net.create() {
            let _ = net.undefine();
            return Err(err("network start", e));
        }
        Ok(())
    }

    /// Stops (if running) and undefines network `name`; a missing one is fine.
    pub fn remove_network(&self, name: &str) -> Result<()> {
        let net = match self.conn.lookup_network_by_name(name) {
            Ok(n) => n,
            Err(e) if e.code().is(ErrorNumber::NoNetwork) => return Ok(()),
            Err(source) => {
                return Err(Error::Libvirt {
                    op: "network lookup",
                    domain: format!("network {name}"),
                    source,
                })
            }
        };
        if net.is_active().unwrap_or(false) {
            let _ = net.destroy();
        }
        net.undefine().map_err(|source| Error::Libvirt {
            op: "network undefine",
            domain: format!("network {name}"),
            source,
        })
    }

    /// The names of all networks, running or not.
    pub fn network_names(&self) -> Result<Vec<String>> {
        let nets = self
            .conn
            .list_all_networks(0)
            .map_err(|source| Error::Libvirt {
                op: "list networks",
                domain: String::from("*"),
                source,
            })?;
        Ok(nets.iter().filter_map(|n| n.name().ok()).collect())
    }

    /// The names of all domains, running or not.
    pub fn domain_names(&self) -> Result<Vec<String>> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|source| Error::Libvirt {
                op: "list domains",
                domain: String::from("*"),
                source,
            })?;
        let mut names = Vec::with_capacity(doms.len());
        for d in doms {
            if let Ok(n) = d.name() {
                names.push(n);
            }
        }
        names.sort();
        Ok(names)
    }
}

/// A block job on a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockJob {
    /// An active commit (the only kind vmbackup starts).
    pub active_commit: bool,
    /// Progress: `cur` of `end`; ready to pivot when they are equal.
    pub cur: u64,
    pub end: u64,
}

impl BlockJob {
    pub fn ready(&self) -> bool {
        self.end > 0 && self.cur == self.end
    }
}

/// A libvirt domain.
pub struct Dom {
    dom: Domain,
    name: String,
}

/// What `Dom::state` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    Running,
    Paused,
    ShutOff,
    Other,
}

impl Dom {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn err(&self, op: &'static str) -> impl FnOnce(virt::error::Error) -> Error + '_ {
        move |source| Error::Libvirt {
            op,
            domain: self.name.clone(),
            source,
        }
    }

    pub fn uuid(&self) -> Result<String> {
        self.dom.uuid_string().map_err(self.err("uuid"))
    }

    /// The persistent definition, secrets included: whoever stores it keeps it 0600.
    pub fn inactive_xml(&self) -> Result<String> {
        self.dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
            .map_err(self.err("read inactive XML"))
    }

    /// The running definition (the same as the inactive one when the domain is shut off).
    pub fn live_xml(&self) -> Result<String> {
        self.dom
            .xml_desc(sys::VIR_DOMAIN_XML_SECURE)
            .map_err(self.err("read live XML"))
    }

    pub fn state(&self) -> Result<PowerState> {
        use virt::domain::DomainState as S;
        let info = self.dom.info().map_err(self.err("state"))?;
        Ok(match info.state {
            s if s.is(S::Running) || s.is(S::Blocked) => PowerState::Running,
            s if s.is(S::Paused) || s.is(S::PMSuspended) => PowerState::Paused,
            s if s.is(S::Shutoff) || s.is(S::Crashed) => PowerState::ShutOff,
            _ => PowerState::Other,
        })
    }

    pub fn is_active(&self) -> Result<bool> {
        self.dom.is_active().map_err(self.err("is_active"))
    }

    pub fn start(&self) -> Result<()> {
        self.dom.create().map_err(self.err("start"))?;
        Ok(())
    }

    /// Powers the domain off at once (no guest shutdown). A domain that is not running is fine.
    pub fn destroy(&self) -> Result<()> {
        match self.dom.destroy() {
            Ok(()) => Ok(()),
            Err(e) if e.code().is(ErrorNumber::OperationInvalid) => Ok(()),
            Err(e) => Err(self.err("destroy")(e)),
        }
    }

    /// Removes the persistent definition together with libvirt's snapshot and checkpoint
    /// metadata and NVRAM; disk images are left alone.
    pub fn undefine(&self) -> Result<()> {
        let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA;
        match self.dom.undefine_flags(flags) {
            Ok(()) => Ok(()),
            Err(e) if e.code().is(ErrorNumber::NoDomain) => Ok(()),
            Err(e) => Err(self.err("undefine")(e)),
        }
    }

    /// Sends one guest-agent command and returns its `return` value.
    pub fn agent_command(&self, command: &Value, timeout: Duration) -> Result<Value> {
        let name = command
            .get("execute")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        let reply = self
            .dom
            .qemu_agent_command(&command.to_string(), secs, 0)
            .map_err(|source| self.agent_error(&name, source))?;
        let mut v: Value = serde_json::from_str(&reply).map_err(|e| Error::AgentReply {
            command: name.clone(),
            detail: e.to_string(),
        })?;
        match v.get_mut("return") {
            Some(r) => Ok(r.take()),
            None => Err(Error::AgentReply {
                command: name,
                detail: format!("no \"return\" in {reply}"),
            }),
        }
    }

    fn agent_error(&self, command: &str, source: virt::error::Error) -> Error {
        let unavailable = source.code().is(ErrorNumber::AgentUnresponsive)
            || source.code().is(ErrorNumber::AgentUnsynced)
            || source.code().is(ErrorNumber::OperationInvalid);
        if unavailable {
            Error::AgentUnavailable {
                domain: self.name.clone(),
                source,
            }
        } else {
            Error::Agent {
                domain: self.name.clone(),
                command: command.to_string(),
                source,
            }
        }
    }

    /// How long libvirt waits for the guest agent in its own agent calls (freeze, thaw,
    /// fs-info, quiesced snapshots) before giving up.
    pub fn set_agent_timeout(&self, timeout: Duration) -> Result<()> {
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        raw::agent_set_response_timeout(&self.dom, secs).map_err(self.err("set agent timeout"))
    }

    /// Freezes the guest's filesystems (all of them when `mountpoints` is empty) through the
    /// agent; returns how many were frozen. Prefer `guest_agent::freeze`, whose guard thaws.
    pub fn fs_freeze(&self, mountpoints: &[&str]) -> Result<u32> {
        raw::fs_freeze(&self.dom, mountpoints)
            .map_err(|source| self.agent_error("fsfreeze", source))
    }

    /// Whether a guest agent holds the domain's agent channel open, as libvirt last saw it
    /// (the `state` of the channel in the live XML); `None` when the domain has no agent
    /// channel or libvirt does not say.
    pub fn agent_connected(&self) -> Result<Option<bool>> {
        agent_channel_state(&self.live_xml()?)
    }

    /// Thaws the guest's filesystems; returns how many were thawed.
    pub fn fs_thaw(&self, mountpoints: &[&str]) -> Result<u32> {
        raw::fs_thaw(&self.dom, mountpoints).map_err(|source| self.agent_error("fsthaw", source))
    }
}

impl Dom {
    /// Creates an external disk-only snapshot from `xml` (a `<domainsnapshot>`), atomically
    /// for all disks and without libvirt snapshot metadata. With `quiesce`, libvirt freezes the
    /// guest's filesystems through the agent just before and thaws them just after, inside
    /// this one call (and thaws even when the snapshot fails or the caller dies meanwhile).
    /// The overlay files named in `xml` must exist already (created empty, with the disk as
    /// their backing file), so that the guest is not kept frozen while they are made.
    pub fn snapshot_disk_only(&self, xml: &str, quiesce: bool) -> Result<()> {
        let mut flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT;
        if quiesce {
            flags |= sys::VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE;
        }
        match self.dom.create_snapshot_xml(xml, flags) {
            Ok(_) => Ok(()),
            Err(e) if quiesce => Err(self.agent_error("quiesced snapshot", e)),
            Err(e) => Err(self.err("disk-only snapshot")(e)),
        }
    }

    /// Starts an active block commit of `disk`'s top image into its backing image.
    pub fn block_commit_active(&self, disk: &str) -> Result<()> {
        raw::block_commit(&self.dom, disk, sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE)
            .map_err(self.err("block commit"))
    }

    /// The block job on `disk`, if there is one.
    pub fn block_job(&self, disk: &str) -> Result<Option<BlockJob>> {
        let job = raw::block_job_info(&self.dom, disk).map_err(self.err("block job info"))?;
        Ok(job.map(|(kind, cur, end)| BlockJob {
            active_commit: kind == sys::VIR_DOMAIN_BLOCK_JOB_TYPE_ACTIVE_COMMIT as i32,
            cur,
            end,
        }))
    }

    /// Pivots a ready active commit (or copy) of `disk`. `Ok(false)` when the job is not
    /// ready to pivot yet.
    pub fn block_job_pivot(&self, disk: &str) -> Result<bool> {
        match raw::block_job_abort(&self.dom, disk, sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT) {
            Ok(()) => Ok(true),
            Err(e) if e.code().is(ErrorNumber::BlockCopyActive) => Ok(false),
            Err(e) => Err(self.err("pivot")(e)),
        }
    }

    /// Starts a full block copy of `disk` (its whole backing chain, flattened) into the
    /// existing image that `dest_xml` (a `<disk type='file'>` with its `<driver type>`)
    /// names; it mirrors the guest's writes once ready, until pivoted or aborted.
    pub fn block_copy_reuse(&self, disk: &str, dest_xml: &str) -> Result<()> {
        raw::block_copy(
            &self.dom,
            disk,
            dest_xml,
            // libvirt 9.0 refuses a copy of a persistent domain unless its job is transient
            // (not kept across a libvirtd restart: `recover` starts it again then).
            sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT | sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB,
        )
        .map_err(self.err("block copy"))
    }

    /// Cancels the block job on `disk` (the VM stays on its current image).
    pub fn block_job_abort(&self, disk: &str) -> Result<()> {
        raw::block_job_abort(&self.dom, disk, 0).map_err(self.err("abort block job"))
    }

    /// Creates a checkpoint from `xml` (a `<domaincheckpoint>`): on a running domain, libvirt
    /// starts a persistent dirty bitmap in the image of every disk the XML marks
    /// `checkpoint='bitmap'`.
    pub fn checkpoint_create(&self, xml: &str) -> Result<()> {
        raw::checkpoint_create(&self.dom, xml, 0).map_err(self.err("create checkpoint"))
    }

    /// The names of the domain's checkpoints, in libvirt's order (parents before children).
    pub fn checkpoints(&self) -> Result<Vec<String>> {
        raw::checkpoint_names(&self.dom, raw::CHECKPOINT_LIST_TOPOLOGICAL)
            .map_err(self.err("list checkpoints"))
    }

    /// Deletes checkpoint `name`. Without `metadata_only`, libvirt also removes its bitmaps
    /// from the images (merging them into the parent checkpoint's, if any); with it, only
    /// libvirt's record of the checkpoint goes and the images are left alone.
    pub fn checkpoint_delete(&self, name: &str, metadata_only: bool) -> Result<()> {
        let flags = if metadata_only {
            raw::CHECKPOINT_DELETE_METADATA_ONLY
        } else {
            0
        };
        raw::checkpoint_delete(&self.dom, name, flags).map_err(self.err("delete checkpoint"))
    }
}

/// The `state` of the guest agent channel in a live domain XML: `connected` is `true`,
/// `disconnected` is `false`.
fn agent_channel_state(xml: &str) -> Result<Option<bool>> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| Error::Xml(super::xml_edit::XmlError(e.to_string())))?;
    Ok(doc
        .descendants()
        .filter(|n| {
            n.has_tag_name("target")
                && n.attribute("name") == Some("org.qemu.guest_agent.0")
                && n.parent().is_some_and(|p| p.has_tag_name("channel"))
        })
        .find_map(|t| match t.attribute("state") {
            Some("connected") => Some(true),
            Some("disconnected") => Some(false),
            _ => None,
        }))
}

/// The libvirt calls the `virt` crate does not wrap.
mod raw {
    use std::ffi::{c_char, c_int, c_uint, CStr, CString};

    use virt::domain::Domain;
    use virt::error::Error;
    use virt::sys;

    fn c_strings(items: &[&str]) -> Result<Vec<CString>, Error> {
        items
            .iter()
            .map(|s| CString::new(*s).map_err(Error::from))
            .collect()
    }

    type FsCall = unsafe extern "C" fn(
        sys::virDomainPtr,
        *mut *const c_char,
        std::os::raw::c_uint,
        std::os::raw::c_uint,
    ) -> std::os::raw::c_int;

    fn fs_call(dom: &Domain, mountpoints: &[&str], call: FsCall) -> Result<u32, Error> {
        let owned = c_strings(mountpoints)?;
        let mut ptrs: Vec<*const c_char> = owned.iter().map(|c| c.as_ptr()).collect();
        let list = if ptrs.is_empty() {
            std::ptr::null_mut()
        } else {
            ptrs.as_mut_ptr()
        };
        // SAFETY: `dom.as_ptr()` is a live domain reference for as long as `dom` is borrowed.
        // `list` is null with a count of 0, or points to `ptrs.len()` pointers to NUL-terminated
        // strings owned by `owned`; both vectors outlive the call, and libvirt only reads them.
        let n = unsafe { call(dom.as_ptr(), list, ptrs.len() as std::os::raw::c_uint, 0) };
        if n < 0 {
            return Err(Error::last_error());
        }
        Ok(n as u32)
    }

    pub fn fs_freeze(dom: &Domain, mountpoints: &[&str]) -> Result<u32, Error> {
        fs_call(dom, mountpoints, sys::virDomainFSFreeze)
    }

    pub fn fs_thaw(dom: &Domain, mountpoints: &[&str]) -> Result<u32, Error> {
        fs_call(dom, mountpoints, sys::virDomainFSThaw)
    }

    pub fn agent_set_response_timeout(dom: &Domain, secs: i32) -> Result<(), Error> {
        // SAFETY: `dom.as_ptr()` is a live domain reference while `dom` is borrowed; the call
        // takes plain integers and keeps no pointer.
        let rc = unsafe { sys::virDomainAgentSetResponseTimeout(dom.as_ptr(), secs, 0) };
        if rc < 0 {
            return Err(Error::last_error());
        }
        Ok(())
    }

    pub fn block_commit(dom: &Domain, disk: &str, flags: u32) -> Result<(), Error> {
        let disk = CString::new(disk)?;
        // SAFETY: `dom.as_ptr()` is live while `dom` is borrowed; `disk` is a NUL-terminated
        // string that outlives the call; null base and top ask libvirt for the defaults
        // (the top image into its immediate backing image); libvirt keeps no pointer.
        let rc = unsafe {
            sys::virDomainBlockCommit(
                dom.as_ptr(),
                disk.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
                flags,
            )
        };
        if rc < 0 {
            return Err(Error::last_error());
        }
        Ok(())
    }

    pub fn block_copy(dom: &Domain, disk: &str, dest_xml: &str, flags: u32) -> Result<(), Error> {
        let disk = CString::new(disk)?;
        let dest = CString::new(dest_xml)?;
        // SAFETY: `dom.as_ptr()` is live while `dom` is borrowed; `disk` and `dest` are
        // NUL-terminated strings that outlive the call; no typed parameters (null, 0); libvirt
        // keeps no pointer.
        let rc = unsafe {
            sys::virDomainBlockCopy(
                dom.as_ptr(),
                disk.as_ptr(),
                dest.as_ptr(),
                std::ptr::null_mut(),
                0,
                flags,
            )
        };
        if rc < 0 {
            return Err(Error::last_error());
        }
        Ok(())
    }

    pub fn block_job_info(dom: &Domain, disk: &str) -> Result<Option<(i32, u64, u64)>, Error> {
        let disk = CString::new(disk)?;
        let mut info = sys::virDomainBlockJobInfo {
            type_: 0,
            bandwidth: 0,
            cur: 0,
            end: 0,
        };
        // SAFETY: `dom.as_ptr()` is live while `dom` is borrowed; `disk` is NUL-terminated and
        // outlives the call; `info` is a properly aligned, writable struct of the type libvirt
        // fills, living on this stack frame for the whole call.
        let rc =
            unsafe { sys::virDomainGetBlockJobInfo(dom.as_ptr(), disk.as_ptr(), &mut info, 0) };
        match rc {
            r if r < 0 => Err(Error::last_error()),
            0 => Ok(None),
            _ => Ok(Some((info.type_, info.cur, info.end))),
        }
    }

    pub fn block_job_abort(dom: &Domain, disk: &str, flags: u32) -> Result<(), Error> {
        let disk = CString::new(disk)?;
        // SAFETY: `dom.as_ptr()` is live while `dom` is borrowed; `disk` is NUL-terminated and
        // outlives the call; libvirt keeps no pointer.
        let rc = unsafe { sys::virDomainBlockJobAbort(dom.as_ptr(), disk.as_ptr(), flags) };
        if rc < 0 {
            return Err(Error::last_error());
        }
        Ok(())
    }

    /// libvirt's `virDomainCheckpoint`, only ever handled through pointers.
    #[repr(C)]
    struct Checkpoint {
        _opaque: [u8; 0],
    }

    /// `VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL` (libvirt-domain-checkpoint.h).
    pub const CHECKPOINT_LIST_TOPOLOGICAL: c_uint = 1 << 1;
    /// `VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY` (libvirt-domain-checkpoint.h).
    pub const CHECKPOINT_DELETE_METADATA_ONLY: c_uint = 1 << 1;

    // The checkpoint API of libvirt 5.6 and later (libvirt-domain-checkpoint.h), which the
    // virt-sys bindings lack; libvirt itself is linked by virt-sys.
    extern "C" {
        fn virDomainCheckpointCreateXML(
            domain: sys::virDomainPtr,
            xml_desc: *const c_char,
            flags: c_uint,
        ) -> *mut Checkpoint;
        fn virDomainListAllCheckpoints(
            domain: sys::virDomainPtr,
            checkpoints: *mut *mut *mut Checkpoint,
            flags: c_uint,
        ) -> c_int;
        fn virDomainCheckpointLookupByName(
            domain: sys::virDomainPtr,
            name: *const c_char,
            flags: c_uint,
        ) -> *mut Checkpoint;
        fn virDomainCheckpointGetName(checkpoint: *mut Checkpoint) -> *const c_char;
        fn virDomainCheckpointDelete(checkpoint: *mut Checkpoint, flags: c_uint) -> c_int;
        fn virDomainCheckpointFree(checkpoint: *mut Checkpoint) -> c_int;
    }

    /// A checkpoint reference, freed when dropped.
    struct Owned(*mut Checkpoint);

    impl Drop for Owned {
        fn drop(&mut self) {
            // SAFETY: `self.0` is a non-null checkpoint reference that libvirt handed to us
            // (created, looked up or listed) and that nothing else frees; it is freed once,
            // here, and not used afterwards.
            unsafe {
                virDomainCheckpointFree(self.0);
            }
        }
    }

    impl Owned {
        /// Takes over a pointer a libvirt call returned; null means that call failed.
        fn new(ptr: *mut Checkpoint) -> Result<Owned, Error> {
            if ptr.is_null() {
                Err(Error::last_error())
            } else {
                Ok(Owned(ptr))
            }
        }

        fn name(&self) -> Result<String, Error> {
            // SAFETY: `self.0` is a live checkpoint reference; the returned string belongs to
            // it and stays valid while it lives, which covers the copy made below.
            let name = unsafe { virDomainCheckpointGetName(self.0) };
            if name.is_null() {
                return Err(Error::last_error());
            }
            // SAFETY: `name` is non-null and points to a NUL-terminated string owned by the
            // checkpoint, alive for this statement; it is copied out at once.
            Ok(unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned())
        }
    }

    pub fn checkpoint_create(dom: &Domain, xml: &str, flags: c_uint) -> Result<(), Error> {
        let xml = CString::new(xml)?;
        // SAFETY: `dom.as_ptr()` is live while `dom` is borrowed; `xml` is NUL-terminated and
        // outlives the call, which only reads it. The returned reference is owned by `Owned`,
        // which frees it.
        let cp = unsafe { virDomainCheckpointCreateXML(dom.as_ptr(), xml.as_ptr(), flags) };
        Owned::new(cp).map(drop)
    }

    pub fn checkpoint_names(dom: &Domain, flags: c_uint) -> Result<Vec<String>, Error> {
        let mut list: *mut *mut Checkpoint = std::ptr::null_mut();
        // SAFETY: `dom.as_ptr()` is live while `dom` is borrowed; `list` is a writable pointer
        // on this stack frame, where libvirt stores an array it allocated (or leaves null).
        let n = unsafe { virDomainListAllCheckpoints(dom.as_ptr(), &mut list, flags) };
        if n < 0 {
            return Err(Error::last_error());
        }
        if list.is_null() {
            return Ok(Vec::new());
        }
        // Every element is taken over first, so that all are freed even if a name fails.
        let owned: Vec<Owned> = (0..n as usize)
            // SAFETY: libvirt returned `n` elements in `list`, each a checkpoint reference
            // that the caller must free; each is read once and handed to `Owned`.
            .map(|i| Owned(unsafe { *list.add(i) }))
            .collect();
        // SAFETY: the array itself was allocated by libvirt with malloc and is the caller's
        // to free; its elements were copied out above and it is not used again.
        unsafe { libc::free(list.cast()) };
        owned.iter().map(Owned::name).collect()
    }

    pub fn checkpoint_delete(dom: &Domain, name: &str, flags: c_uint) -> Result<(), Error> {
        let name = CString::new(name)?;
        // SAFETY: `dom.as_ptr()` is live while `dom` is borrowed; `name` is NUL-terminated and
        // outlives the call, which only reads it. The returned reference is owned by `Owned`.
        let cp =
            Owned::new(unsafe { virDomainCheckpointLookupByName(dom.as_ptr(), name.as_ptr(), 0) })?;
        // SAFETY: `cp.0` is a live checkpoint reference (freed only when `cp` drops, after this
        // call); deleting the checkpoint does not free the reference.
        let rc = unsafe { virDomainCheckpointDelete(cp.0, flags) };
        if rc < 0 {
            return Err(Error::last_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_channel_state_is_read_from_the_live_xml() {
        let xml = |state: &str| {
            format!(
                "<domain><devices><channel type='unix'><target type='virtio' \
                 name='org.qemu.guest_agent.0'{state}/></channel><channel type='spicevmc'>\
                 <target type='virtio' name='com.redhat.spice.0' state='connected'/></channel>\
                 </devices></domain>"
            )
        };
        assert_eq!(
            agent_channel_state(&xml(" state='connected'")).unwrap(),
            Some(true)
        );
        assert_eq!(
            agent_channel_state(&xml(" state='disconnected'")).unwrap(),
            Some(false)
        );
        assert_eq!(agent_channel_state(&xml("")).unwrap(), None);
        assert_eq!(agent_channel_state("<domain/>").unwrap(), None);
    }
}
