//! Writing files so that a crash never leaves a half-written artifact: write to a
//! temporary sibling, flush and fsync it, rename it over the target, then fsync
//! the folder so that the rename itself survives a power cut. Every artifact of
//! `reid` (checkpoints, trainer state, galleries, manifests, reports) goes through
//! [`write_atomically`].

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{IoError, Result};

/// Marks the temporary sibling of a file being written: `.NAME.tmp-PID`.
const TMP_MARK: &str = ".tmp-";

/// The temporary sibling used while `path` is being written.
pub fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}{TMP_MARK}{}", std::process::id()))
}

/// Writes `path` atomically: `write` fills a temporary file, which is renamed over
/// `path` only when `write` succeeds. Parent folders are created. `write` may
/// fail with the caller's own error type.
pub fn write_atomically<E, F>(path: &Path, write: F) -> std::result::Result<(), E>
where
    E: From<IoError>,
    F: FnOnce(&mut fs::File) -> std::result::Result<(), E>,
{
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        fs::create_dir_all(parent).map_err(|e| IoError::io(parent, e))?;
    }
    let tmp = temporary_path(path);
    let result = (|| {
        let mut file = fs::File::create(&tmp).map_err(|e| IoError::io(&tmp, e))?;
        write(&mut file)?;
        file.flush().map_err(|e| IoError::io(&tmp, e))?;
        file.sync_all().map_err(|e| IoError::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| IoError::io(path, e))?;
        Ok(sync_folder(parent.unwrap_or(Path::new(".")))?)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |f| f.write_all(bytes).map_err(|e| IoError::io(path, e)))
}

/// Makes the entries of `dir` (a rename into it) durable.
fn sync_folder(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IoError::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Whether process `pid` is alive (on other systems than Linux: assumed so).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Removes the temporary files that writers killed mid-write left in `dir`
/// (those of processes no longer running); returns what it removed.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(TMP_MARK))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            fs::remove_file(entry.path()).map_err(|e| IoError::io(entry.path(), e))?;
            removed.push(entry.path());
        }
    }
    removed.sort();
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_neither_target_nor_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let err = write_atomically(&target, |f| {
            f.write_all(b"partial").unwrap();
            Err(IoError::invalid("x", "boom"))
        });
        assert!(err.is_err());
        assert!(!target.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_successful_write_replaces_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("sub/out.bin");
        write_bytes_atomically(&target, b"one").unwrap();
        write_bytes_atomically(&target, b"two").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        assert_eq!(fs::read_dir(target.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        // PIDs above the kernel's maximum (4194304) are never alive.
        let dead = dir.path().join(".last.safetensors.tmp-4999999");
        let own = temporary_path(&dir.path().join("last.safetensors"));
        let plain = dir.path().join("last.safetensors");
        for p in [&dead, &own, &plain] {
            fs::write(p, b"x").unwrap();
        }
        assert_eq!(remove_stale_temporaries(dir.path()).unwrap(), vec![dead.clone()]);
        assert!(!dead.exists() && own.exists() && plain.exists());
    }
}
