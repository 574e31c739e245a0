//! How the daemon learns that another writer (the CLI, an operator, another
//! replica) changed a stored document: a backend's change feed where it has
//! one (the file store's folder, watched with inotify), otherwise a poll of
//! `Store::fingerprint`, otherwise nothing but `reconcile_interval`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask};

use super::Store;

/// How often changes are polled where they cannot be watched, and how often
/// a watched store folder that does not exist (yet) is looked for.
pub const CHANGE_POLL: Duration = Duration::from_millis(500);

/// Set to `poll` to poll the file store instead of watching it (tests of
/// the fallback; a filesystem whose inotify events cannot be trusted).
pub const WATCH_ENV: &str = "KEYROLL_FILE_WATCH";

/// What changed since the last report.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// These keysets' documents were written, replaced or deleted.
    Keysets(BTreeSet<String>),
    /// Anything may have changed (events were lost, the folder was
    /// replaced): reconcile every keyset.
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{var}=poll is set")]
    Disabled { var: &'static str },
    #[error("{dir} is on a network filesystem ({fs}): inotify does not see other hosts' writes")]
    Remote { dir: String, fs: &'static str },
    #[error("cannot start inotify: {0}")]
    Init(io::Error),
    #[error("cannot watch {dir}: {source}")]
    Add { dir: String, source: io::Error },
    #[error("reading inotify events failed: {0}")]
    Read(io::Error),
}

/// A live feed of a backend's document changes.
#[async_trait]
pub trait ChangeFeed: Send + Sync {
    /// Waits for the next change. An error means the feed stopped: the
    /// caller falls back to polling.
    async fn next(&mut self) -> Result<Change, WatchError>;

    /// Called before every pass: a feed that can lose track of its subject
    /// without an event (a folder swapped under it) looks again here, and
    /// says whether it had lost track (then everything is reconciled).
    async fn recheck(&mut self) -> bool {
        false
    }
}

/// The events that can mean a document changed: a save renames a temp
/// file in (`MOVED_TO`), an operator edits in place (`CLOSE_WRITE`),
/// deletes (`DELETE`, C2) or moves a document away, or changes its mode.
/// `*_SELF`: the folder itself was deleted or moved.
fn mask() -> WatchMask {
    WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// The keyset a file name in the store folder belongs to: `<keyset>.json`.
/// Temp files (`.<keyset>.json.XXXXXX`, one per save) and lock files start
/// with a dot and are ignored, as `FileStore::keysets` ignores them.
pub fn keyset_of(name: &OsStr) -> Option<&str> {
    let keyset = name.to_str()?.strip_suffix(".json")?;
    (!keyset.is_empty() && !keyset.starts_with('.')).then_some(keyset)
}

/// The kind of network filesystem `dir` (or, while it does not exist, its
/// nearest existing parent) is on: a folder shared by replicas on several
/// hosts, whose writes from other hosts send this host no inotify event.
fn network_filesystem(dir: &std::path::Path) -> Option<&'static str> {
    use std::os::unix::ffi::OsStrExt;
    let existing = dir.ancestors().find(|path| path.exists())?;
    let path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stat` is a buffer of
    // the type statfs fills; it is read only when statfs succeeded.
    let stat = unsafe {
        if libc::statfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    // linux/magic.h; FUSE covers sshfs, GlusterFS, s3fs and the like.
    let kind = match stat.f_type as i64 {
        0x6969 => "NFS",
        0x517B => "SMB",
        0xFF534D42 => "CIFS",
        0xFE534D42 => "SMB2",
        0x00C3_6400 => "Ceph",
        0x0116_1970 => "GFS2",
        0x7461_636F => "OCFS2",
        0x5346_414F => "AFS",
        0x0102_1997 => "9P",
        0x0BD0_0BD0 => "Lustre",
        0x6573_5546 => "FUSE",
        _ => return None,
    };
    Some(kind)
}

/// The file store's folder, watched with inotify.
pub struct FolderWatch {
    dir: PathBuf,
    events: EventStream<Vec<u8>>,
    /// The watch on the folder; `None` while the folder does not exist.
    watching: Option<(WatchDescriptor, u64)>,
}

impl FolderWatch {
    /// Starts watching `dir`; a folder that does not exist yet is watched
    /// from when it appears.
    pub fn new(dir: PathBuf) -> Result<FolderWatch, WatchError> {
        if std::env::var(WATCH_ENV).is_ok_and(|mode| mode == "poll") {
            return Err(WatchError::Disabled { var: WATCH_ENV });
        }
        if let Some(fs) = network_filesystem(&dir) {
            return Err(WatchError::Remote {
                dir: dir.display().to_string(),
                fs,
            });
        }
        let inotify = Inotify::init().map_err(WatchError::Init)?;
        let events = inotify
            .into_event_stream(vec![0u8; 4096])
            .map_err(WatchError::Init)?;
        let mut watch = FolderWatch {
            dir,
            events,
            watching: None,
        };
        watch.add()?;
        Ok(watch)
    }

    /// Watches the folder now at `dir`, if there is one; whether it is watched.
    fn add(&mut self) -> Result<bool, WatchError> {
        if let Some((old, _)) = self.watching.take() {
            // The kernel may have dropped it already (folder deleted).
            let _ = self.events.watches().remove(old);
        }
        let inode = match std::fs::metadata(&self.dir) {
            Ok(meta) if meta.is_dir() => meta.ino(),
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(self.add_error(source)),
        };
        let wd = self
            .events
            .watches()
            .add(&self.dir, mask())
            .map_err(|source| self.add_error(source))?;
        self.watching = Some((wd, inode));
        Ok(true)
    }

    fn add_error(&self, source: io::Error) -> WatchError {
        WatchError::Add {
            dir: self.dir.display().to_string(),
            source,
        }
    }

    /// Waits for the folder to exist and watches it.
    async fn appear(&mut self) -> Result<Change, WatchError> {
        let mut tick = tokio::time::interval(CHANGE_POLL);
        loop {
            tick.tick().await;
            if self.add()? {
                tracing::debug!(dir = %self.dir.display(), "store folder appeared; watching it");
                return Ok(Change::Unknown);
            }
        }
    }

    /// What one event means, merged into `change`.
    fn take(
        &mut self,
        event: inotify::EventOwned,
        change: &mut Option<Change>,
    ) -> Result<(), WatchError> {
        let mut merge = |more: Change| {
            *change = match (change.take(), more) {
                (None, more) => Some(more),
                (Some(Change::Keysets(mut a)), Change::Keysets(b)) => {
                    a.extend(b);
                    Some(Change::Keysets(a))
                }
                _ => Some(Change::Unknown),
            }
        };
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            merge(Change::Unknown);
            return Ok(());
        }
        let ours = self
            .watching
            .as_ref()
            .is_some_and(|(wd, _)| *wd == event.wd);
        if !ours {
            return Ok(()); // a watch replaced since: its last events
        }
        let gone =
            EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED | EventMask::UNMOUNT;
        if event.mask.intersects(gone) {
            tracing::debug!(dir = %self.dir.display(), "store folder deleted or moved; watching its path again");
            self.add()?;
            merge(Change::Unknown);
            return Ok(());
        }
        if event.mask.contains(EventMask::ATTRIB) && event.name.is_none() {
            // The folder's own mode changed: loads may start failing.
            merge(Change::Unknown);
            return Ok(());
        }
        if let Some(keyset) = event.name.as_deref().and_then(keyset_of) {
            merge(Change::Keysets(BTreeSet::from([keyset.to_string()])));
        }
        Ok(())
    }
}

#[async_trait]
impl ChangeFeed for FolderWatch {
    async fn next(&mut self) -> Result<Change, WatchError> {
        loop {
            if self.watching.is_none() {
                return self.appear().await;
            }
            let first = match self.events.next().await {
                Some(event) => event.map_err(WatchError::Read)?,
                None => return Err(WatchError::Read(io::ErrorKind::UnexpectedEof.into())),
            };
            let mut change = None;
            self.take(first, &mut change)?;
            // One report for everything already queued: a save is several
            // events (temp file created, written, renamed in).
            while let Some(Some(event)) = self.events.next().now_or_never() {
                self.take(event.map_err(WatchError::Read)?, &mut change)?;
            }
            if let Some(change) = change {
                return Ok(change);
            }
        }
    }

    /// A folder replaced by a rename over it sends no event to the old
    /// folder's watch on every kernel: compare inodes at every pass (one
    /// `stat`).
    async fn recheck(&mut self) -> bool {
        let now = std::fs::metadata(&self.dir).ok().map(|m| m.ino());
        let watched = self.watching.as_ref().map(|(_, inode)| *inode);
        if now == watched {
            return false;
        }
        tracing::debug!(dir = %self.dir.display(), "store folder replaced; watching the new one");
        if let Err(e) = self.add() {
            tracing::debug!(error = %e, "cannot watch the store folder again");
        }
        true
    }
}

/// How a daemon notices changes: set up at its first pass.
enum Mode {
    Unstarted,
    Feed(Box<dyn ChangeFeed>),
    /// Fingerprints taken before the last pass, per keyset.
    Poll(Vec<(String, Option<String>)>),
}

/// The daemon's side: a feed when the backend offers one, a fingerprint
/// poll when it does not or the feed fails.
pub struct StoreWatch {
    store: Arc<dyn Store>,
    mode: Mode,
}

impl StoreWatch {
    pub fn new(store: Arc<dyn Store>) -> StoreWatch {
        StoreWatch {
            store,
            mode: Mode::Unstarted,
        }
    }

    pub fn is_watching(&self) -> bool {
        matches!(self.mode, Mode::Feed(_))
    }

    /// Before a pass reconciles `keysets`: starts the feed the first time
    /// (so that a write landing during the pass is reported after it), or,
    /// when polling, takes their fingerprints. Our own saves in the pass
    /// are reported too and cost one pass of the keysets saved. Returns
    /// whether the feed had lost track of the store: a pass that was not
    /// `full` must then reconcile every keyset.
    pub async fn before_pass(&mut self, keysets: &[String], full: bool) -> bool {
        if let Mode::Unstarted = self.mode {
            self.mode = match self.store.watch() {
                Some(Ok(feed)) => {
                    tracing::info!(
                        store = %self.store.location("<keyset>"),
                        "watching the store for changes (inotify)"
                    );
                    Mode::Feed(feed)
                }
                Some(Err(why)) => {
                    tracing::warn!(
                        store = %self.store.location("<keyset>"),
                        reason = %why,
                        "cannot watch the store: polling it for changes every {}",
                        humantime::format_duration(CHANGE_POLL)
                    );
                    Mode::Poll(Vec::new())
                }
                None => Mode::Poll(Vec::new()),
            };
        }
        match &mut self.mode {
            // A full pass reads everything anyway; a feed just started
            // is not behind.
            Mode::Feed(feed) => return feed.recheck().await && !full,
            Mode::Unstarted => {}
            Mode::Poll(seen) => {
                for keyset in keysets {
                    let fingerprint = self.store.fingerprint(keyset).await;
                    match seen.iter_mut().find(|(name, _)| name == keyset) {
                        Some(entry) => entry.1 = fingerprint,
                        None => seen.push((keyset.clone(), fingerprint)),
                    }
                }
            }
        }
        false
    }

    /// Completes when a document changes; never, if nothing can tell.
    pub async fn changed(&mut self) -> Change {
        match &mut self.mode {
            Mode::Feed(feed) => match feed.next().await {
                Ok(change) => change,
                Err(e) => {
                    tracing::warn!(
                        store = %self.store.location("<keyset>"),
                        error = %e,
                        "watching the store failed: polling it for changes every {} from now on",
                        humantime::format_duration(CHANGE_POLL)
                    );
                    // Empty: the next (full) pass takes every fingerprint.
                    self.mode = Mode::Poll(Vec::new());
                    Change::Unknown
                }
            },
            Mode::Poll(seen) => poll_fingerprints(self.store.as_ref(), seen).await,
            Mode::Unstarted => std::future::pending().await,
        }
    }
}

/// Polls until some fingerprints differ from `seen`; never, if the store
/// cannot tell.
async fn poll_fingerprints(store: &dyn Store, seen: &[(String, Option<String>)]) -> Change {
    if seen.iter().all(|(_, fingerprint)| fingerprint.is_none()) {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(CHANGE_POLL);
    loop {
        tick.tick().await;
        let mut changed = BTreeSet::new();
        for (keyset, before) in seen {
            if before.is_some() && store.fingerprint(keyset).await != *before {
                changed.insert(keyset.clone());
            }
        }
        if !changed.is_empty() {
            return Change::Keysets(changed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_documents_name_a_keyset() {
        assert_eq!(keyset_of(OsStr::new("default.json")), Some("default"));
        assert_eq!(keyset_of(OsStr::new(".default.json.aB3dE9")), None);
        assert_eq!(keyset_of(OsStr::new(".default.lock")), None);
        assert_eq!(keyset_of(OsStr::new(".json")), None);
        assert_eq!(keyset_of(OsStr::new("notes.txt")), None);
    }

    async fn next_within(watch: &mut FolderWatch) -> Change {
        tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("a change is reported")
            .expect("the watch works")
    }

    #[tokio::test]
    async fn reports_saves_and_deletions_by_keyset_and_ignores_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = FolderWatch::new(dir.path().to_path_buf()).unwrap();
        crate::fsutil::write_atomic(&dir.path().join("a.json"), b"{}", 0o600).unwrap();
        std::fs::write(dir.path().join(".a.lock"), b"").unwrap();
        assert_eq!(
            next_within(&mut watch).await,
            Change::Keysets(BTreeSet::from(["a".to_string()]))
        );
        std::fs::write(dir.path().join(".b.json.XXXXXX"), b"").unwrap();
        std::fs::remove_file(dir.path().join("a.json")).unwrap();
        assert_eq!(
            next_within(&mut watch).await,
            Change::Keysets(BTreeSet::from(["a".to_string()]))
        );
    }

    #[tokio::test]
    async fn a_replaced_folder_is_watched_again() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("store");
        std::fs::create_dir(&dir).unwrap();
        let mut watch = FolderWatch::new(dir.clone()).unwrap();
        std::fs::rename(&dir, parent.path().join("old")).unwrap();
        assert_eq!(next_within(&mut watch).await, Change::Unknown);
        std::fs::create_dir(&dir).unwrap();
        // Whether or not the new folder was there when the old one went,
        // the next report is about it.
        let mut change = next_within(&mut watch).await;
        if change == Change::Unknown {
            std::fs::write(dir.join("b.json"), b"{}").unwrap();
            change = next_within(&mut watch).await;
        }
        assert_eq!(change, Change::Keysets(BTreeSet::from(["b".to_string()])));
    }
}
