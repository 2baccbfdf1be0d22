//! Small durable-file helpers shared by the catalog, shard manifests and segment files.
//!
//! Every file is written whole to `<name>.tmp`, fsynced, renamed over the old one, and the
//! directory is fsynced, so a crash leaves either the old or the new file, never a mix. A CRC32
//! trailer catches files damaged at rest.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::{ClusterError, Result};

pub fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| ClusterError::io(&tmp, e))?;
    f.write_all(body).map_err(|e| ClusterError::io(&tmp, e))?;
    f.write_all(&crc32fast::hash(body).to_le_bytes()).map_err(|e| ClusterError::io(&tmp, e))?;
    f.sync_all().map_err(|e| ClusterError::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| ClusterError::io(path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Reads a file written by `write_atomic`; `Ok(None)` when it does not exist.
pub fn read_checked(path: &Path) -> Result<Option<Vec<u8>>> {
    let mut bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ClusterError::io(path, e)),
    };
    if bytes.len() < 4 {
        return Err(ClusterError::Corrupt(format!("{} is truncated ({} bytes)", path.display(), bytes.len())));
    }
    let body_len = bytes.len() - 4;
    let want = u32::from_le_bytes(bytes[body_len..].try_into().expect("4 bytes"));
    bytes.truncate(body_len);
    if crc32fast::hash(&bytes) != want {
        return Err(ClusterError::Corrupt(format!("{} fails its checksum", path.display())));
    }
    Ok(Some(bytes))
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| ClusterError::io(dir, e))
}

pub fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| ClusterError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("manifest");
        assert!(read_checked(&p).unwrap().is_none());
        write_atomic(&p, b"hello").unwrap();
        assert_eq!(read_checked(&p).unwrap().unwrap(), b"hello");
        let mut raw = fs::read(&p).unwrap();
        raw[0] ^= 1;
        fs::write(&p, raw).unwrap();
        assert!(matches!(read_checked(&p), Err(ClusterError::Corrupt(_))));
    }
}
