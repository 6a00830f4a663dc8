//! The background half of `mount`: a process that holds the repository's shared lock (as
//! `serve` does, so no gc frees the chunks it reads) and exposes each chosen disk of the
//! backup as a read-only file of a FUSE file system (the `fuser` crate, mounted by the kernel
//! directly: no libfuse, no fusermount). Reads go through `serve`'s chunk path
//! (`serve::DiskSource`: digest-checked, cached); a chunk that cannot be read is `EIO` to the
//! reader and a log line, never other data. The process runs until its FUSE file system is
//! unmounted (what `umount` does) or a stop signal comes.

use std::ffi::OsStr;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, Request, FUSE_ROOT_ID,
};

use crate::error::{Error, Result};
use crate::nbd::server::BlockSource;
use crate::repository::Repository;
use crate::serve::DiskSource;

/// The FUSE file system's type in the mount table: `fuse.vmbackup`.
pub const SUBTYPE: &str = "vmbackup";
/// What the daemon prints on its standard output once the file system is mounted.
pub const READY: &str = "ready";

/// What the daemon serves.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub id: String,
    pub disks: Vec<String>,
    /// Where to mount the FUSE file system (an empty folder).
    pub at: PathBuf,
}

/// The disks as files: inode 2 + i is disk i; the root folder is inode 1.
struct DiskFiles {
    disks: Vec<Arc<DiskSource>>,
    time: SystemTime,
}

const TTL: Duration = Duration::from_secs(3600);

impl DiskFiles {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = if ino == FUSE_ROOT_ID {
            (FileType::Directory, 0o500, 0, 2)
        } else {
            let d = self.disk(ino)?;
            (FileType::RegularFile, 0o400, d.size(), 1)
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn disk(&self, ino: u64) -> Option<&Arc<DiskSource>> {
        ino.checked_sub(2).and_then(|i| self.disks.get(i as usize))
    }
}

impl Filesystem for DiskFiles {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let found = (parent == FUSE_ROOT_ID)
            .then(|| {
                self.disks
                    .iter()
                    .position(|d| OsStr::new(&d.target) == name)
            })
            .flatten()
            .and_then(|i| self.attr(i as u64 + 2));
        match found {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if self.disk(ino).is_none() {
            return reply.error(libc::ENOENT);
        }
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        // The content never changes: the kernel may keep what it cached.
        reply.opened(0, fuser::consts::FOPEN_KEEP_CACHE);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(d) = self.disk(ino) else {
            return reply.error(libc::ENOENT);
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        let len = (size as u64).min(d.size().saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        // A chunk that cannot be read (missing, damaged) is logged by the source.
        match d.read_at(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(_) => reply.error(libc::EIO),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != FUSE_ROOT_ID {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (FUSE_ROOT_ID, FileType::Directory, ".".into()),
            (FUSE_ROOT_ID, FileType::Directory, "..".into()),
        ];
        for (i, d) in self.disks.iter().enumerate() {
            entries.push((i as u64 + 2, FileType::RegularFile, d.target.clone()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, i as i64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Runs the daemon: mounts the disks of backup `opts.id` at `opts.at`, prints `READY` on
/// standard output, and serves until the file system is unmounted or a stop signal comes.
pub fn daemon(repo: Arc<Repository>, opts: &DaemonOptions) -> Result<()> {
    let m = repo.load(&opts.id)?;
    let chosen = crate::serve::chosen_disks(&m, &opts.disks)?;
    let (disks, lock) = crate::serve::open_sources(&repo, &m, &chosen)?;
    let fs = DiskFiles {
        disks,
        time: SystemTime::now(),
    };
    let options = [
        MountOption::RO,
        MountOption::NoExec,
        MountOption::FSName(format!("vmbackup:{}", m.id)),
        MountOption::Subtype(SUBTYPE.into()),
        MountOption::DefaultPermissions,
    ];
    let session = fuser::Session::new(fs, &opts.at, &options)
        .map_err(|e| Error::io("mount a FUSE file system at", &opts.at, e))?;
    let session = session
        .spawn()
        .map_err(|e| Error::io("start the FUSE session at", &opts.at, e))?;
    tracing::info!(backup = %m.id, at = %opts.at.display(), "the backup's disks are mounted (FUSE, read-only)");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{READY}");
        let _ = out.flush();
    }
    loop {
        if session.guard.is_finished() {
            tracing::info!("the FUSE file system was unmounted: stopping");
            break;
        }
        if crate::interrupt::requested() {
            tracing::info!("stop signal: unmounting the FUSE file system");
            break;
        }
        // A gc may free the chunks from now on: unmounted rather than EIO later.
        if lock.is_lost() {
            tracing::error!("the repository lock was lost: unmounting the FUSE file system");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Unmounts (when still mounted; a busy one stays, and is gone with this process).
    drop(session);
    Ok(())
}
