//! Source volumes: image files and block devices.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::AgentError;

/// A volume the agent replicates.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// Volume name.
    pub name: String,
    /// Path of the image file or block device.
    pub path: PathBuf,
}

impl std::str::FromStr for VolumeSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, path) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not NAME=PATH"))?;
        if !pilotlight_protocol::limits::valid_name(name) {
            return Err(format!(
                "{name:?} is not a valid volume name (use 1 to 64 of a-z, 0-9, '.', '_', '-')"
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            path: PathBuf::from(path),
        })
    }
}

/// Size of a file or block device, and whether it is a block device.
pub fn probe(name: &str, path: &Path) -> Result<(u64, bool), AgentError> {
    let err = |e| AgentError::Source {
        volume: name.to_owned(),
        path: path.to_owned(),
        source: e,
    };
    let mut f = File::open(path).map_err(err)?;
    let is_device = f.metadata().map_err(err)?.file_type().is_block_device();
    let size = f.seek(SeekFrom::End(0)).map_err(err)?;
    Ok((size, is_device))
}
