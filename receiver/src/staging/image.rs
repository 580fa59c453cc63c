//! One staging image: a volume of a server brought up to a point from the
//! store, and the check at `Open` that the staging filesystem can hold a
//! volume of the declared size.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use pilotlight_protocol::limits::block_len;

use crate::catalog::VolumeRow;
use crate::store::{create_private_dir, punch_hole, BlockFetcher, Store, PRIVATE_FILE_MODE};
use crate::ReceiveError;

/// Bring the staging image of volume `v` of `server` up to `point`,
/// applying only the blocks that changed after the point the image is known
/// to equal (all of them when the image is missing or of another size).
/// Blocking.
pub(crate) fn update(
    store: &Store,
    server: &str,
    mut v: VolumeRow,
    point: i64,
    fetch: &mut BlockFetcher,
    buf: &mut Vec<u8>,
) -> Result<(), ReceiveError> {
    let path = store.staging_path(server, &v.name);
    // A staging image that is missing or of the wrong size is rebuilt.
    let intact = std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == v.size);
    if !intact {
        v.staging_point = 0;
    }
    if v.staging_point == point {
        return Ok(());
    }
    let map = store.catalog()?.block_map(v.id, point, v.staging_point)?;
    if let Some(parent) = path.parent() {
        create_private_dir(parent)?;
    }
    let file = File::options()
        .read(true)
        .write(true)
        .mode(PRIVATE_FILE_MODE)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| ReceiveError::storage(&path, e))?;
    if v.staging_point == 0 {
        file.set_len(0)
            .map_err(|e| ReceiveError::storage(&path, e))?;
    }
    file.set_len(v.size)
        .map_err(|e| ReceiveError::storage(&path, e))?;
    for (index, hash) in map {
        let offset = index * u64::from(v.block_size);
        let len = block_len(v.size, v.block_size, index);
        if len == 0 {
            continue;
        }
        match hash {
            None => punch_hole(&file, offset, u64::from(len))
                .map_err(|e| ReceiveError::storage(&path, e))?,
            Some(h) => {
                let loc = store.locate(&h)?;
                fetch.fetch_current(store, &loc, &h, buf)?;
                file.write_all_at(buf, offset)
                    .map_err(|e| ReceiveError::storage(&path, e))?;
            }
        }
    }
    file.sync_data()
        .map_err(|e| ReceiveError::storage(&path, e))?;
    store.catalog()?.set_staging_point(v.id, point)?;
    Ok(())
}

/// Refuse a volume of `size` bytes that the staging filesystem cannot hold
/// as one file (ext4 with 4 KiB blocks: 16 TiB), before any of its data is
/// accepted. Blocking.
///
/// The check is the operation staging does: a sparse probe file beside the
/// image is given the size (`ftruncate`, which allocates nothing) and
/// removed. `EFBIG` refuses the volume with
/// [`ReceiveError::VolumeTooLarge`]. Any other failure is left to the
/// staging task, which reports and retries it per volume: replication goes
/// on.
pub(crate) fn check_room(
    store: &Store,
    server: &str,
    volume: &str,
    size: u64,
) -> Result<(), ReceiveError> {
    let path = store.staging_path(server, volume);
    // An image already that large: the filesystem holds the size.
    if std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() >= size) {
        return Ok(());
    }
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let probe = dir.join(format!(
        ".{volume}.{:016x}.size-probe",
        rand::random::<u64>()
    ));
    let result = create_private_dir(dir).and_then(|()| {
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(PRIVATE_FILE_MODE)
            .open(&probe)
            .map_err(|e| ReceiveError::storage(&probe, e))?;
        let grown = file.set_len(size);
        drop(file);
        let _ = std::fs::remove_file(&probe);
        grown.map_err(|e| ReceiveError::storage(&probe, e))
    });
    match result {
        Err(ReceiveError::Storage { source, .. }) if source.raw_os_error() == Some(libc::EFBIG) => {
            Err(ReceiveError::VolumeTooLarge {
                volume: volume.to_owned(),
                size,
                path,
            })
        }
        Err(e) => {
            tracing::warn!(server, volume, cause = %e, "cannot check the room for a staging image; replicating anyway");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}
