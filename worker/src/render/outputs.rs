//! Staged and published outputs. A render writes to a staging file next to
//! the output folder; publishing is one atomic rename into place, done only
//! after the progress service accepted the completion. A rename of a staged
//! file can happen once - the second finds it gone - so even two workers
//! finishing the same accepted publication cannot publish twice.

use std::io;
use std::path::{Path, PathBuf};

pub struct Outputs {
    dir: PathBuf,
    staging: PathBuf,
}

/// What became of an attempt to publish.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    Now,
    /// The staged file is gone: already published by whoever got there first.
    AlreadyGone,
}

impl Outputs {
    /// Creates the output folder and its `.staging` subfolder.
    pub fn open(dir: &Path) -> io::Result<Self> {
        let staging = dir.join(".staging");
        std::fs::create_dir_all(&staging)?;
        Ok(Outputs {
            dir: dir.to_path_buf(),
            staging,
        })
    }

    /// A staging file unique to this attempt.
    pub fn staging_path(&self, key: &str, slot: &str, epoch: u64, attempt: u32) -> PathBuf {
        self.staging
            .join(format!("{key}.{slot}.e{epoch}.a{attempt}"))
    }

    pub fn final_path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Moves an accepted staged output into place.
    pub fn publish(&self, staged: &Path, key: &str) -> io::Result<Published> {
        if staged.parent() != Some(self.staging.as_path()) {
            return Err(io::Error::other(format!(
                "{} is not in the staging folder {}",
                staged.display(),
                self.staging.display()
            )));
        }
        match std::fs::rename(staged, self.final_path(key)) {
            Ok(()) => Ok(Published::Now),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Published::AlreadyGone),
            Err(e) => Err(e),
        }
    }

    /// Removes a staged output that will never be published.
    pub fn discard(&self, staged: &Path) {
        let _ = std::fs::remove_file(staged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_is_published_once() {
        let dir = tempfile::tempdir().unwrap();
        let out = Outputs::open(dir.path()).unwrap();
        let staged = out.staging_path("u1", "w-0", 3, 1);
        std::fs::write(&staged, "video").unwrap();
        assert_eq!(out.publish(&staged, "u1").unwrap(), Published::Now);
        assert_eq!(out.publish(&staged, "u1").unwrap(), Published::AlreadyGone);
        assert_eq!(
            std::fs::read_to_string(out.final_path("u1")).unwrap(),
            "video"
        );
    }

    #[test]
    fn only_files_from_the_staging_folder_are_published() {
        let dir = tempfile::tempdir().unwrap();
        let out = Outputs::open(dir.path()).unwrap();
        assert!(out.publish(Path::new("/etc/passwd"), "x").is_err());
    }
}
