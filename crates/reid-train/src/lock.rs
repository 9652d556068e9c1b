//! A run folder has one owner: the process holding an OS lock on `RUN/.lock`.
//! The lock dies with its process (a `kill -9` leaves nothing stale), and a
//! second process that asks for it is refused at once, writing nothing.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::trainer::TrainError;

/// The lock file inside a run folder.
pub const LOCK_FILE: &str = ".lock";

/// The held lock of a run folder; released when dropped or when the process ends.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of `run_dir` (which must exist), and records this
    /// process's id in it; [`TrainError::Busy`] where another process holds it.
    pub fn acquire(run_dir: &Path) -> Result<Self, TrainError> {
        let path = run_dir.join(LOCK_FILE);
        let io = |source| TrainError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(TrainError::Busy {
                    run: run_dir.to_path_buf(),
                    pid: pid.trim().to_string(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(RunLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_refuses_a_second_owner_until_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunLock::acquire(dir.path()).unwrap();
        let err = RunLock::acquire(dir.path()).unwrap_err();
        let said = err.to_string();
        assert!(said.contains(&std::process::id().to_string()), "{said}");
        assert!(said.contains(&dir.path().display().to_string()), "{said}");
        drop(first);
        RunLock::acquire(dir.path()).unwrap();
    }
}
