//! "Pulling" an image for a non-root container. Images here are local
//! binaries in the cargo target folder, which may sit under a home folder
//! other users cannot enter; a container that runs as another user gets a
//! world-readable copy in the sandbox folder, as a runtime unpacks a layer.
//! Copies are keyed by size and modification time, so a rebuild is picked up.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(ImageStore { dir })
    }

    /// A path to `program` that any user can execute. Programs given by bare
    /// name (found on PATH) and system binaries are returned unchanged.
    pub fn readable(&self, program: &str) -> io::Result<String> {
        let path = Path::new(program);
        if !path.is_absolute() || program.starts_with("/bin/") || program.starts_with("/usr/") {
            return Ok(program.to_string());
        }
        let meta = std::fs::metadata(path)?;
        let mtime = meta
            .modified()?
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "program".into());
        let copy = self.dir.join(format!("{name}-{}-{mtime}", meta.len()));
        if !copy.exists() {
            let partial = self
                .dir
                .join(format!(".{name}.{}.partial", std::process::id()));
            std::fs::copy(path, &partial)?;
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
            std::fs::rename(&partial, &copy)?;
        }
        Ok(copy.to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_once_per_build_and_leaves_system_programs_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::new(dir.path().join("images")).unwrap();
        let bin = dir.path().join("tool");
        std::fs::write(&bin, "v1").unwrap();
        let a = store.readable(bin.to_str().unwrap()).unwrap();
        let b = store.readable(bin.to_str().unwrap()).unwrap();
        assert_eq!(a, b);
        let mode = std::fs::metadata(&a).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        std::fs::write(&bin, "version 2").unwrap();
        assert_ne!(
            store.readable(bin.to_str().unwrap()).unwrap(),
            a,
            "a rebuild is a new image"
        );
        assert_eq!(store.readable("/bin/sh").unwrap(), "/bin/sh");
        assert_eq!(store.readable("sh").unwrap(), "sh");
    }
}
