//! The signer's socket paths, treated like every other output (SPEC §4): a
//! missing folder is created; a stale socket left by a crash is replaced;
//! any other file at the path, or a parent that is not a folder, is refused
//! and never deleted. The socket gets `socket_mode` and its folder's group,
//! so the folder's group decides who may sign.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use super::SignerError;
use crate::config::{Config, Problem};

/// `sun_path` holds 108 bytes on Linux, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// The socket paths of `config` with their config keys.
fn socket_paths(config: &Config) -> Vec<(&'static str, &Path)> {
    let Some(signer) = &config.signer else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    if let Some(path) = &signer.socket {
        paths.push(("socket", path.as_path()));
    }
    if let Some(kubernetes) = &signer.kubernetes {
        paths.push(("kubernetes_socket", kubernetes.socket.as_path()));
    }
    paths
}

/// What `validate` and `run` refuse about the socket paths, without
/// touching them: a path that exists and is not a socket, a parent that is
/// not a writable folder, a path too long for a socket, two outputs on one
/// path.
pub fn check_socket_paths(config: &Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    let paths = socket_paths(config);
    let others = other_outputs(config);
    for (index, (key, path)) in paths.iter().enumerate() {
        let mut refuse = |message: String| {
            problems.push(Problem {
                line: None,
                key: format!("signer.{key}"),
                message,
            })
        };
        if let Err(message) = check_one(path) {
            refuse(message);
            continue;
        }
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        if let Some((other, _)) = paths[..index]
            .iter()
            .find(|(_, p)| std::path::absolute(p).ok().as_deref() == Some(&absolute))
        {
            refuse(format!(
                "{} is also signer.{other}: each socket needs its own path",
                path.display()
            ));
        } else if let Some((other, _)) = others.iter().find(|(_, p)| absolute.starts_with(p)) {
            refuse(format!(
                "{} is inside {other}, which keyroll writes: give the socket its own path",
                path.display()
            ));
        }
    }
    problems
}

/// Paths keyroll writes that a socket must stay out of.
fn other_outputs(config: &Config) -> Vec<(String, PathBuf)> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut outputs = Vec::new();
    if let crate::config::StoreSettings::File { dir } = &config.store {
        outputs.push(("the store folder (store.dir)".to_string(), absolute(dir)));
    }
    for keyset in &config.keysets {
        if let Some(file) = &keyset.jwks_file {
            outputs.push((
                format!("keysets[{}].jwks_file", keyset.name),
                absolute(file),
            ));
        }
        if let Some(dir) = &keyset.signing_dir {
            outputs.push((
                format!("keysets[{}].signing_dir", keyset.name),
                absolute(dir),
            ));
        }
    }
    outputs
}

fn check_one(path: &Path) -> Result<(), String> {
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "{} is {} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}",
            path.display(),
            path.as_os_str().len()
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; keyroll never deletes it: remove it or choose another path",
                path.display()
            ))
        }
        // Not there, or under a file: the parent's check below says which.
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    crate::fsutil::writable_dir(parent_of(path))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Binds a socket at `path` for `key` (`socket` or `kubernetes_socket`).
pub(super) fn bind(
    path: &Path,
    mode: u32,
    key: &'static str,
) -> Result<(UnixListener, SocketFile), SignerError> {
    let fail = |message: String| SignerError::Socket {
        key,
        path: path.display().to_string(),
        message,
    };
    check_one(path).map_err(fail)?;
    let parent = parent_of(path);
    // A folder keyroll creates is traversable by all: the socket's own
    // mode and group decide who may connect.
    crate::fsutil::ensure_dir(parent, 0o755)
        .map_err(|e| fail(format!("cannot create the folder: {e}")))?;
    if std::fs::symlink_metadata(path).is_ok() {
        // A socket is there (check_one refused anything else). If a process
        // still answers on it, it is not stale: leave it to that process.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(fail(
                "another process is listening on this socket (is keyroll already running?)".into(),
            ));
        }
        tracing::info!(socket = %path.display(), "replacing a stale socket");
    }
    // Bound in a private (0700) folder beside the path, given its group and
    // mode there, then renamed into place (replacing a stale socket): no
    // client can connect while the mode is still the umask's.
    let private = tempfile::Builder::new()
        .prefix(".keyroll-socket.")
        .tempdir_in(parent)
        .map_err(|e| fail(format!("cannot create a temporary folder beside it: {e}")))?;
    let staged = private.path().join("s");
    let listener = UnixListener::bind(&staged).map_err(|e| fail(format!("cannot listen: {e}")))?;
    let group = std::fs::metadata(parent)
        .map_err(|e| fail(format!("cannot read the folder's group: {e}")))?
        .gid();
    match std::os::unix::fs::chown(&staged, None, Some(group)) {
        Ok(()) => {}
        // Not a member of the folder's group, as under systemd's
        // DynamicUser= (the runtime folder gets the user's own group): the
        // socket keeps keyroll's primary group, the unit's Group=, which is
        // the group signers join.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let own = std::fs::metadata(&staged).map(|m| m.gid()).ok();
            tracing::warn!(
                socket = %path.display(),
                folder_group = group,
                socket_group = ?own,
                "keyroll is not in its folder's group: the socket keeps keyroll's own group, whose members may sign"
            );
        }
        Err(e) => {
            return Err(fail(format!(
                "cannot give the socket its folder's group {group}: {e}"
            )))
        }
    }
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("cannot set the socket's mode {mode:o}: {e}")))?;
    std::fs::rename(&staged, path)
        .map_err(|e| fail(format!("cannot move the socket into place: {e}")))?;
    let inode = std::fs::symlink_metadata(path).ok().map(|m| m.ino());
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            inode,
        },
    ))
}

/// Removes the socket at `path` when the server stops, if it is still the
/// one this process bound (same inode): a successor's is left alone.
pub(super) struct SocketFile {
    path: PathBuf,
    inode: Option<u64>,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let current = std::fs::symlink_metadata(&self.path).ok();
        if current.is_some_and(|m| m.file_type().is_socket() && Some(m.ino()) == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
